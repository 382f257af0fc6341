#!/usr/bin/env bash
# Installs what the producer examples (examples/producers/<lang>/run) need:
# toolchains and AMQP clients from Debian's packages where Debian has them,
# pika/jsonschema from PyPI and amqplib/ajv from npm (pinned by their lock files).
# Installs only what is missing, so a second run takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "producers-setup: $*" >&2; }

# Debian package → why it is needed.
packages=(
  golang-go                              # go
  golang-github-rabbitmq-amqp091-go-dev  # go: amqp091-go, used in GOPATH mode (no module download)
  ruby ruby-bunny                        # ruby
  php-cli php-amqplib                    # php
  default-jdk librabbitmq-client-java    # java: javac and the RabbitMQ Java client jar
  libjackson2-databind-java              # java: Jackson, to read the jobs (the JDK has no JSON parser)
  nodejs npm                             # node
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
# A Node.js or JDK from elsewhere (nvm, a vendor JDK) is fine: do not install a second one.
filtered=()
for p in ${missing[@]+"${missing[@]}"}; do
  case "$p" in
    nodejs | npm) command -v node >/dev/null && command -v npm >/dev/null && continue ;;
    default-jdk) command -v javac >/dev/null && continue ;;
  esac
  filtered+=("$p")
done

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
apt_install() {
  command -v apt-get >/dev/null || { say "no apt-get: install $* with your package manager"; exit 1; }
  say "installing $*"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ ${#filtered[@]} -gt 0 ]; then
  apt_install "${filtered[@]}"
else
  say "system packages present"
fi

if python3 -c 'import pika, jsonschema' 2>/dev/null; then
  say "pika and jsonschema present"
elif ! python3 -m pip install --quiet -r examples/producers/python/requirements.txt; then
  # Debian's own Python refuses pip installs (PEP 668); its packages are the same libraries.
  apt_install python3-pika python3-jsonschema
fi

node_dir=examples/producers/node
# npm ci wipes node_modules; skip it when the installed tree matches the lock file.
if [ -f "$node_dir/node_modules/.package-lock.json" ] &&
  [ "$node_dir/node_modules/.package-lock.json" -nt "$node_dir/package-lock.json" ]; then
  say "node modules present"
else
  (cd "$node_dir" && npm ci --silent --no-audit --no-fund)
fi
say "ready"
