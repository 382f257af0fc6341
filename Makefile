# The README's two commands are `make demo` and `make test`; CI runs .ci/run.
.PHONY: demo test test-rabbitmq4 test-cluster lint lint-deploy bench broker broker4 cluster4 deny producers-setup browser-setup fuzz

broker:
	scripts/ensure-rabbitmq.sh

# RabbitMQ 4.0 (Debian 13's) on 127.0.0.1:5673, beside the machine's own broker.
broker4:
	scripts/ensure-rabbitmq4.sh

# A three-node RabbitMQ 4 cluster on 127.0.0.1:5691-5693, in broker4's chroot (installed as broker4 does when missing).
cluster4:
	scripts/ensure-rabbitmq4-cluster.sh

# The broker-facing tests where RabbitMQ 4 behaves differently (quorum delivery
# limits and poison jobs, DLQ reads, confirms into tiers and the DLQ, reconnects,
# alarms, producers, waits past a consumer-timeout policy, single-active-consumer
# handovers; in dlq also the audit stream, the DLQ's reader lock, and its
# retention TTL and drop-head; the console's DLQ passes and actions), run again on 4.x. The 4-replica rate test (replicas) runs on 3.x
# only: it measures herald's limiter, which no broker version changes.
RABBITMQ4_TESTS = --test netease_lane --test dlq --test tencent --test openim \
	--test broker_outage --test http_enqueue --test producers --test settlement \
	--test flow_control --test consumer_timeout --test handover --test console
RABBITMQ4_CTL = chroot /var/lib/herald/rabbitmq4 /usr/bin/env -i PATH=/usr/sbin:/usr/bin \
	HOME=/var/lib/rabbitmq rabbitmqctl -n herald4-5673@localhost

demo: broker
	cargo run --release --locked -- demo

test: broker broker4 producers-setup browser-setup
	cargo test --locked --all-targets
	$(MAKE) test-rabbitmq4
	$(MAKE) test-cluster
	scripts/fuzz.sh

test-rabbitmq4: broker4
	HERALD_TEST_AMQP_URL='amqp://guest:guest@127.0.0.1:5673/%2f' HERALD_TEST_RABBITMQCTL='$(RABBITMQ4_CTL)' \
		cargo test --locked $(RABBITMQ4_TESTS)

# Failover between cluster nodes: kills the node herald uses, then restarts it (tests/cluster.rs).
test-cluster: cluster4
	cargo test --locked --test cluster -- --ignored --nocapture

# Toolchains and AMQP clients for examples/producers (tests/producers.rs runs them all).
producers-setup:
	scripts/producers-setup.sh

# Debian's chromium and chromium-driver, for the console's browser test (tests/console_browser.rs).
browser-setup:
	scripts/browser-setup.sh

lint:
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings

# Every decoder of outside input under libFuzzer, FUZZ_SECONDS (default 60) each.
fuzz:
	scripts/fuzz.sh

# Docker images cannot be built here; lint and check what can be: scripts, YAML,
# the alert rules (promtool) and every kustomize overlay (kubernetes-validate --strict).
# Installs shellcheck, promtool, yamllint and kubernetes-validate when missing.
lint-deploy:
	scripts/lint-deploy.sh

# herald-bench runs `herald run`, the bare loop and the receiver as child processes,
# and the Node and Go baselines from bench/baselines (Go and Node from producers-setup).
BENCH = target/release/herald-bench
bench: broker producers-setup
	cargo build --release --locked --bins
	cd bench/baselines/node && npm ci --silent --no-audit --no-fund
	$(BENCH) throughput --jobs 50000
	$(BENCH) latency --rate 1000 --seconds 20
	$(BENCH) rss --jobs 1000000
	$(BENCH) adaptive --latency-ms 1 --fixed 256,1024,2048 --jobs 50000 --rounds 3
	$(BENCH) adaptive --latency-ms 100 --fixed 1024,2048 --jobs 300000 --rounds 3
	$(BENCH) dlq-stats --jobs 100000
	$(BENCH) console --jobs 100000
	$(BENCH) http-enqueue --jobs 50000 --batch 100,500 --clients 4

deny:
	cargo deny check
