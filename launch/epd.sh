#!/usr/bin/env bash
# E/P/D topology: the frontend + NUM_ENCODE encode workers (vision tower only) + NUM_PREFILL
# prefill workers + NUM_DECODE decode workers; embeddings and KV move over UCX.
#   MODEL=/path/to/model HTTP_PORT=8000 NUM_ENCODE=1 NUM_PREFILL=1 NUM_DECODE=1 launch/epd.sh
# Every variable is described in docs/topologies.md.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NUM_ENCODE="${NUM_ENCODE:-1}"
NUM_PREFILL="${NUM_PREFILL:-1}"
NUM_DECODE="${NUM_DECODE:-1}"
check_count NUM_ENCODE "$NUM_ENCODE"
check_count NUM_PREFILL "$NUM_PREFILL"
check_count NUM_DECODE "$NUM_DECODE"
check_inputs
ensure_etcd
ensure_nats
start_frontend
start_workers encode "$NUM_ENCODE"
start_workers prefill "$NUM_PREFILL"
start_workers decode "$NUM_DECODE"
serve_forever "encode=$NUM_ENCODE prefill=$NUM_PREFILL decode=$NUM_DECODE"
