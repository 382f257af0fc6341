#!/usr/bin/env bash
# Makes sure a RabbitMQ 4.x node answers on 127.0.0.1:$HERALD_RMQ4_PORT (default
# 5673), beside the machine's own broker, so that the broker-facing tests run on
# both: reuses a running node, starts an installed one, and installs one only
# when it is missing. The node is Debian 13's rabbitmq-server (4.0.x) in a
# debootstrap chroot under $HERALD_RMQ4_ROOT (default /var/lib/herald/rabbitmq4),
# with its own node name, ports and data directory. Needs root and Debian's
# package registry; `HERALD_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:5673/%2f
# cargo test` then runs the tests against it.
set -euo pipefail

root=${HERALD_RMQ4_ROOT:-/var/lib/herald/rabbitmq4}
port=${HERALD_RMQ4_PORT:-5673}
dist_port=$((port + 20000))
node=${HERALD_RMQ4_NODE:-herald4-$port@localhost}

reachable() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
say() { echo "ensure-rabbitmq4: $*" >&2; }
in_root() {
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq \
    RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$port" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_DIST_PORT="$dist_port" RABBITMQ_MNESIA_BASE="/var/lib/rabbitmq/mnesia-$port" \
    RABBITMQ_LOG_BASE=/var/log/rabbitmq "$@"
}

if reachable; then
  say "RabbitMQ answers on 127.0.0.1:$port"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { say "needs root (debootstrap, mount, chroot)"; exit 1; }

if [ ! -x "$root/usr/sbin/rabbitmq-server" ]; then
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  say "installing Debian 13 (trixie) with rabbitmq-server into $root (about a minute)"
  mkdir -p "$root"
  debootstrap --variant=minbase --include=rabbitmq-server trixie "$root" >"$root.debootstrap.log" 2>&1 \
    || { say "debootstrap failed; see $root.debootstrap.log"; exit 1; }
fi

for fs in proc dev sys; do
  mountpoint -q "$root/$fs" || mount --bind "/$fs" "$root/$fs"
done
say "starting $node on 127.0.0.1:$port"
in_root rabbitmq-server -detached >/dev/null 2>&1 || true
for _ in $(seq 1 90); do
  if reachable; then
    in_root rabbitmqctl -n "$node" await_startup --timeout 60 >/dev/null 2>&1 || true
    say "RabbitMQ $(in_root rabbitmqctl -n "$node" version 2>/dev/null || echo 4.x) answers on 127.0.0.1:$port"
    exit 0
  fi
  sleep 1
done
say "RabbitMQ 4 did not come up on 127.0.0.1:$port within 90 s; see $root/var/log/rabbitmq/"
exit 1
