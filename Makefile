# The README's two commands are `make demo` and `make test`; CI runs .ci/run.
.PHONY: demo test lint lint-deploy bench broker deny fuzz

broker:
	scripts/ensure-rabbitmq.sh

demo: broker
	cargo run --release --locked -- demo

test: broker
	cargo test --locked --all-targets

lint:
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings

# Every decoder of outside input under libFuzzer, FUZZ_SECONDS (default 60) each.
fuzz:
	scripts/fuzz.sh

# Docker images cannot be built here; lint what can be linted.
# Needs shellcheck (apt-get install shellcheck) and yamllint (pip install yamllint).
lint-deploy:
	shellcheck scripts/ensure-rabbitmq.sh scripts/fuzz.sh .ci/run examples/producers/publish.sh
	yamllint -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' deploy/compose.yaml deploy/kubernetes/

bench: broker
	cargo run --release --locked --bin herald-bench -- throughput --jobs 20000
	cargo run --release --locked --bin herald-bench -- dlq-stats --jobs 100000

deny:
	cargo deny check
