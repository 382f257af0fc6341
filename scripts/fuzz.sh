#!/usr/bin/env bash
# Fuzzes herald's decoders with cargo-fuzz (libFuzzer + AddressSanitizer): each
# target runs FUZZ_SECONDS (default 60) with memory bounded (-rss_limit_mb=1024,
# -malloc_limit_mb=256) and prints its executions and corpus size. Exits non-zero
# if any target crashes, leaks, hangs or allocates past the limits; the input
# that did it is in fuzz/artifacts/<target>/.
#
# The committed seeds (fuzz/seeds/<target>) are merged into a working corpus
# (fuzz/corpus/<target>, not committed) that grows from run to run.
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass
# its -Z flags. cargo-fuzz is installed when missing. FUZZ_TARGET_DIR puts the
# instrumented build elsewhere than fuzz/target (CI keeps it between runs: a
# cold build of every dependency with ASan and coverage takes 15 CPU-minutes).
set -euo pipefail

cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
export RUSTC_BOOTSTRAP=1

say() { echo "fuzz: $*" >&2; }

if ! command -v cargo-fuzz >/dev/null; then
  say "installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

targets=()
while IFS= read -r target; do
  targets+=("$target")
done < <(cargo fuzz list)

build_args=()
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
  build_args+=(--target-dir "$FUZZ_TARGET_DIR")
fi

say "building ${#targets[@]} target(s)"
cargo fuzz build ${build_args[@]+"${build_args[@]}"}

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=()
summary=()
for target in "${targets[@]}"; do
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus"
  for seed in "fuzz/seeds/$target"/*; do
    if [ -e "$seed" ] && [ ! -e "$corpus/${seed##*/}" ]; then
      cp "$seed" "$corpus/"
    fi
  done
  log="$logs/$target.log"
  say "$target: ${seconds}s"
  started=$(date +%s)
  status=ok
  if ! cargo fuzz run ${build_args[@]+"${build_args[@]}"} "$target" "$corpus" -- \
    -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=1024 -malloc_limit_mb=256 \
    -print_final_stats=1 >"$log" 2>&1; then
    status=FAILED
    failed+=("$target")
    # The panic or sanitizer report, then libFuzzer's note on the failing input.
    sed -n '/panicked at\|==ERROR:/,$p' "$log" | head -n 30 >&2
    tail -n 12 "$log" >&2
  fi
  wall=$(( $(date +%s) - started ))
  execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -n 1)
  files=$(find "$corpus" -type f | wc -l)
  bytes=$(find "$corpus" -type f -exec cat {} + | wc -c)
  summary+=("$(printf '%-18s %-6s execs=%-10s corpus=%s files (%s bytes) wall=%ss' \
    "$target" "$status" "${execs:-?}" "$files" "$bytes" "$wall")")
done

printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  say "crashed: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
