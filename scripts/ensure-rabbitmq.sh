#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on $HERALD_BROKER_HOST:$HERALD_BROKER_PORT
# (default 127.0.0.1:5672): uses one that is running, starts an installed one,
# or installs it from the system's packages first (apt, dnf or Homebrew).
# herald needs RabbitMQ 3.10 or newer (quorum queues with message TTL and
# at-least-once dead-lettering). HERALD_RABBITMQ_SBIN (default /usr/sbin) is
# where the system's package puts rabbitmq-server; tests/scripts.rs points it
# at stubs to exercise the install path.
set -euo pipefail

host=${HERALD_BROKER_HOST:-127.0.0.1}
port=${HERALD_BROKER_PORT:-5672}
sbin=${HERALD_RABBITMQ_SBIN:-/usr/sbin}

reachable() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }
say() { echo "ensure-rabbitmq: $*" >&2; }

if reachable; then
  say "RabbitMQ answers on $host:$port"
  exit 0
fi

if [ "$host" != 127.0.0.1 ] && [ "$host" != localhost ]; then
  say "nothing answers on $host:$port and it is not this machine; start that broker first"
  exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { say "need root (or sudo) to install or start RabbitMQ"; exit 1; }
  sudo="sudo"
fi

server=$(command -v rabbitmq-server || true)
[ -n "$server" ] || { [ -x "$sbin/rabbitmq-server" ] && server=$sbin/rabbitmq-server; } || true
if [ -z "$server" ]; then
  say "RabbitMQ is not installed; installing it from the system's packages"
  if command -v apt-get >/dev/null; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    server=$sbin/rabbitmq-server
  elif command -v dnf >/dev/null; then
    $sudo dnf install -y -q rabbitmq-server
    server=$sbin/rabbitmq-server
  elif command -v brew >/dev/null; then
    brew install rabbitmq
    server="$(brew --prefix)/sbin/rabbitmq-server"
    sudo=""
  else
    say "no apt-get, dnf or brew here: install RabbitMQ >= 3.10 yourself (https://www.rabbitmq.com/docs/download)"
    exit 1
  fi
fi

# The package may have started it already (systemd); otherwise start it detached.
for _ in $(seq 1 10); do reachable && break; sleep 1; done
if ! reachable; then
  say "starting $server"
  $sudo "$server" -detached >/dev/null 2>&1 || true
fi
for _ in $(seq 1 90); do
  if reachable; then
    # The port can open before the node has finished booting (feature flags, quorum queues).
    if command -v rabbitmqctl >/dev/null; then
      $sudo rabbitmqctl await_startup --timeout 60 >/dev/null 2>&1 || true
    fi
    say "RabbitMQ answers on $host:$port"
    exit 0
  fi
  sleep 1
done
say "RabbitMQ did not come up on $host:$port within 90 s; see its log (e.g. /var/log/rabbitmq/)"
exit 1
