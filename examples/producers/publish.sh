#!/usr/bin/env bash
# Publish jobs with the herald binary: every job is checked against the contract
# and your config (vendor, account, field limits) before anything is published.
set -euo pipefail
herald enqueue --config "${HERALD_CONFIG:-herald.toml}" <<'JOBS'
{"id":"order-1","vendor":"netease","account":"default","from":"system","to":{"user":"u1"},"key":"order.shipped","data":{"order":1}}
{"id":"order-2","vendor":"netease","account":"default","from":"system","to":{"user":"u2"},"key":"order.shipped","data":{"order":2}}
JOBS
