#!/usr/bin/env bash
# Aggregated topology: the frontend + NUM_WORKERS agg workers (each encodes, prefills and decodes).
#   MODEL=/path/to/model HTTP_PORT=8000 NUM_WORKERS=1 launch/agg.sh
# Every variable is described in docs/topologies.md.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NUM_WORKERS="${NUM_WORKERS:-1}"
check_count NUM_WORKERS "$NUM_WORKERS"
check_inputs
ensure_etcd
ensure_nats
start_frontend
start_workers agg "$NUM_WORKERS"
serve_forever "agg=$NUM_WORKERS"
