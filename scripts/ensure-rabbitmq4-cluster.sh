#!/usr/bin/env bash
# Makes sure a three-node RabbitMQ 4.x cluster answers on 127.0.0.1:5691-5693
# ($HERALD_RMQ4_CLUSTER_PORTS), beside the machine's own broker and the single
# 4.x node of scripts/ensure-rabbitmq4.sh, for tests/cluster.rs: reuses running
# nodes, starts installed ones (all at once: a clustered node waits for its
# peers while it boots), and installs RabbitMQ 4 only when it is missing (by
# running scripts/ensure-rabbitmq4.sh, which also starts its own node). The
# nodes share that script's debootstrap chroot and Erlang cookie; each has its
# own node name (herald4-<port>@localhost), AMQP port, distribution port
# (<port> + 20000) and data directory, and the second and third join the first
# with `rabbitmqctl join_cluster`. Needs root.
set -euo pipefail

root=${HERALD_RMQ4_ROOT:-/var/lib/herald/rabbitmq4}
read -r -a ports <<<"${HERALD_RMQ4_CLUSTER_PORTS:-5691 5692 5693}"
[ "${#ports[@]}" -ge 2 ] || { echo "ensure-rabbitmq4-cluster: HERALD_RMQ4_CLUSTER_PORTS needs two or more ports" >&2; exit 1; }

say() { echo "ensure-rabbitmq4-cluster: $*" >&2; }
node_of() { echo "herald4-$1@localhost"; }
reachable() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Runs a command in the chroot with node `$1`'s environment.
in_root() {
  local port=$1
  shift
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq \
    RABBITMQ_NODENAME="$(node_of "$port")" RABBITMQ_NODE_PORT="$port" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_DIST_PORT="$((port + 20000))" RABBITMQ_MNESIA_BASE="/var/lib/rabbitmq/mnesia-$port" \
    RABBITMQ_LOG_BASE=/var/log/rabbitmq "$@"
}
ctl() {
  local port=$1
  shift
  in_root "$port" rabbitmqctl -n "$(node_of "$port")" "$@"
}
# The nodes `$1` sees running in its cluster.
running_nodes() {
  ctl "$1" cluster_status --formatter json 2>/dev/null | grep -o '"running_nodes":\[[^]]*\]' || true
}

all_running() {
  local seen
  seen=$(running_nodes "${ports[0]}")
  for port in "${ports[@]}"; do
    reachable "$port" && [[ $seen == *"\"$(node_of "$port")\""* ]] || return 1
  done
}

if all_running; then
  say "cluster of ${#ports[@]} answers on 127.0.0.1 ports ${ports[*]}"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { say "needs root (chroot, mount)"; exit 1; }

if [ ! -x "$root/usr/sbin/rabbitmq-server" ]; then
  "$(dirname "$0")/ensure-rabbitmq4.sh"
  [ -x "$root/usr/sbin/rabbitmq-server" ] \
    || { say "RabbitMQ 4 is not installed in $root (ensure-rabbitmq4.sh found a broker on its port and installed nothing)"; exit 1; }
fi
for fs in proc dev sys; do
  mountpoint -q "$root/$fs" || mount --bind "/$fs" "$root/$fs"
done

for port in "${ports[@]}"; do
  if ! reachable "$port"; then
    say "starting $(node_of "$port") on 127.0.0.1:$port"
    in_root "$port" rabbitmq-server -detached >/dev/null 2>&1 || true
  fi
done
for port in "${ports[@]}"; do
  for _ in $(seq 1 120); do
    reachable "$port" && break
    sleep 1
  done
  reachable "$port" || { say "$(node_of "$port") did not come up on 127.0.0.1:$port within 120 s; see $root/var/log/rabbitmq/"; exit 1; }
  ctl "$port" await_startup --timeout 60 >/dev/null
done

seed=$(node_of "${ports[0]}")
for port in "${ports[@]:1}"; do
  [[ $(running_nodes "$port") == *"\"$seed\""* ]] && continue
  say "joining $(node_of "$port") to $seed"
  ctl "$port" stop_app >/dev/null
  ctl "$port" join_cluster "$seed" >/dev/null
  ctl "$port" start_app >/dev/null
done

all_running || { say "the nodes did not form one cluster: $(running_nodes "${ports[0]}")"; exit 1; }
say "cluster of ${#ports[@]} ($(ctl "${ports[0]}" version 2>/dev/null || echo 4.x)) answers on 127.0.0.1 ports ${ports[*]}"
