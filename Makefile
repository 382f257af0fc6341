# The README's two commands are `make demo` and `make test`; CI runs .ci/run.
.PHONY: demo test lint lint-deploy bench broker deny producers-setup

broker:
	scripts/ensure-rabbitmq.sh

demo: broker
	cargo run --release --locked -- demo

test: broker
	cargo test --locked --all-targets

# Toolchains and AMQP clients for examples/producers (tests/producers.rs runs them all).
producers-setup:
	scripts/producers-setup.sh

lint:
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings

# Docker images cannot be built here; lint what can be linted.
# Needs shellcheck (apt-get install shellcheck) and yamllint (pip install yamllint).
lint-deploy:
	shellcheck scripts/ensure-rabbitmq.sh scripts/producers-setup.sh .ci/run examples/producers/*/run
	yamllint -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' deploy/compose.yaml deploy/kubernetes/

bench: broker
	cargo run --release --locked --bin herald-bench -- throughput --jobs 20000
	cargo run --release --locked --bin herald-bench -- dlq-stats --jobs 100000

deny:
	cargo deny check
