#!/usr/bin/env bash
# Lints and checks deploy/ without a cluster or Docker (make lint-deploy; CI runs it):
# ShellCheck on the scripts, yamllint on every YAML file, promtool on the alert
# rules and their unit tests, and every kustomize overlay rendered and validated
# with kubernetes-validate --strict. Installs what is missing (scripts/deploy-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$(scripts/deploy-tools.sh)

shellcheck scripts/*.sh .ci/run examples/producers/*/run
"$bin/yamllint" --strict -c deploy/yamllint.yaml deploy/
promtool check rules deploy/monitoring/herald-rules.yaml
(cd deploy/monitoring && promtool test rules herald-rules.test.yaml)

if command -v kubectl >/dev/null; then
  kustomize=(kubectl kustomize)
elif command -v kustomize >/dev/null; then
  kustomize=(kustomize build)
else
  echo "lint-deploy: needs kubectl (for kubectl kustomize) or kustomize" >&2
  exit 1
fi
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
for overlay in deploy/kubernetes/overlays/*/; do
  name=$(basename "$overlay")
  "${kustomize[@]}" "$overlay" > "$rendered/$name.yaml"
  # Custom resources (KEDA, Prometheus Operator) have no schema there; tests/deploy.rs checks them.
  "$bin/kubernetes-validate" --strict --quiet "$rendered/$name.yaml"
  "$bin/yamllint" --strict -d '{extends: default, rules: {line-length: disable, document-start: disable, indentation: disable}}' "$rendered/$name.yaml"
  echo "lint-deploy: overlay $name: $(grep -c '^kind:' "$rendered/$name.yaml") objects valid"
done
