#!/usr/bin/env bash
# EP/D topology: the frontend + NUM_PREFILL prefill workers (they encode images in-process)
# + NUM_DECODE decode workers; the KV cache moves from prefill to decode over UCX.
#   MODEL=/path/to/model HTTP_PORT=8000 NUM_PREFILL=1 NUM_DECODE=1 launch/disagg.sh
# Every variable is described in docs/topologies.md.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NUM_PREFILL="${NUM_PREFILL:-1}"
NUM_DECODE="${NUM_DECODE:-1}"
check_count NUM_PREFILL "$NUM_PREFILL"
check_count NUM_DECODE "$NUM_DECODE"
check_inputs
ensure_etcd
ensure_nats
start_frontend
start_workers prefill "$NUM_PREFILL"
start_workers decode "$NUM_DECODE"
serve_forever "prefill=$NUM_PREFILL decode=$NUM_DECODE"
