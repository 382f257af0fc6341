#!/usr/bin/env bash
# Installs what `make lint-deploy` needs, only what is missing:
#   ShellCheck, promtool (Debian package `prometheus`), kubectl (for `kubectl kustomize`;
#   not installed here: Debian has no package, use your distribution's or the upstream binary),
#   yamllint and kubernetes-validate from PyPI, in a virtualenv, pinned in scripts/deploy-requirements.txt.
# Prints the virtualenv's bin directory on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "deploy-tools: $*" >&2; }

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

missing=()
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || { say "no apt-get: install ${missing[*]} with your package manager"; exit 1; }
  say "installing ${missing[*]}"
  $sudo apt-get update -qq >&2
  # The prometheus package is only here for promtool; its server is not started in containers without systemd.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

venv="${HERALD_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/herald/deploy-venv}"
requirements=scripts/deploy-requirements.txt
stamp="$venv/.requirements"
if ! cmp -s "$requirements" "$stamp" 2>/dev/null; then
  say "installing $(grep -cv '^#' "$requirements") Python package(s) into $venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements" >&2
  cp "$requirements" "$stamp"
fi
echo "$venv/bin"
