#!/usr/bin/env bash
# Deploy Triad over the nodes of a Slurm allocation. Run it inside one:
#     salloc -N3 --exclusive bash deploy/slurm/triad_srun.sh      (or from an sbatch script)
# The head node (first of SLURM_JOB_NODELIST, or HEAD_NODE) runs etcd, nats-server and the
# frontend; the other nodes run the workers (the head too when the allocation has one node).
# Every process is one `srun --overlap` step. The script waits until /health lists every worker,
# prints the endpoint, stays in the foreground, and on SIGTERM/SIGINT/exit stops the steps it
# started: workers first (they drain and deregister), then the frontend, NATS and etcd.
# Environment (defaults in brackets; see docs/deployment.md):
#   TOPOLOGY [epd]: agg | disagg (EP/D) | epd (E/P/D)
#   MODEL [<repo>/models/triad-tiny-vlm]   SERVED_MODEL_NAME []   TRIAD_NAMESPACE [triad]
#   NUM_AGG NUM_ENCODE NUM_PREFILL NUM_DECODE [1 each]
#   AGG_NODES ENCODE_NODES PREFILL_NODES DECODE_NODES [the worker nodes]: Slurm host lists;
#       a role's workers are spread round-robin over its nodes
#   GPUS_PER_WORKER [0 = CPU]   GPUS_PER_NODE [8]   DEVICE [cpu, or cuda when GPUS_PER_WORKER > 0]
#   HEAD_NODE [first node]   HEAD_ADDR [resolved on the head]   NODE_ADDR [resolved per node]
#   HEAD_RUNS_WORKERS [1 with one node, else 0]   CONTROL_PLANE_ONLY [0]: 1 starts etcd + NATS only
#   HTTP_PORT [8000]  TRIAD_ETCD_PORT [2379]  TRIAD_ETCD_PEER_PORT [2380]  TRIAD_NATS_PORT [4222]
#   NATS_MAX_PAYLOAD [8388608]   NATS_MAX_PENDING [1073741824]   FRONTEND_HOST [0.0.0.0]   WORKER_ARGS []   FRONTEND_ARGS []   SRUN_ARGS []   TRIAD_LEASE_TTL
#   RUN_DIR [./triad-run-$SLURM_JOB_ID]   READY_TIMEOUT [900]   STOP_TIMEOUT [60]
#   TRIAD_REPO [this checkout]   TRIAD_PYTHON [$TRIAD_REPO/.venv/bin/python]
#   TRIAD_ETCD_BIN [etcd on PATH]   TRIAD_NATS_BIN [nats-server next to TRIAD_PYTHON, else PATH]
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export TRIAD_REPO="${TRIAD_REPO:-$(cd "$SCRIPT_DIR/../.." && pwd)}"
export TRIAD_PYTHON="${TRIAD_PYTHON:-$TRIAD_REPO/.venv/bin/python}"
TOPOLOGY="${TOPOLOGY:-epd}"
MODEL="${MODEL:-$TRIAD_REPO/models/triad-tiny-vlm}"
export TRIAD_NAMESPACE="${TRIAD_NAMESPACE:-triad}"
HTTP_PORT="${HTTP_PORT:-8000}"
TRIAD_ETCD_PORT="${TRIAD_ETCD_PORT:-2379}"
TRIAD_ETCD_PEER_PORT="${TRIAD_ETCD_PEER_PORT:-2380}"
TRIAD_NATS_PORT="${TRIAD_NATS_PORT:-4222}"
export GPUS_PER_WORKER="${GPUS_PER_WORKER:-0}"
DEVICE="${DEVICE:-$( (( GPUS_PER_WORKER > 0 )) && echo cuda || echo cpu)}"
FRONTEND_HOST="${FRONTEND_HOST:-0.0.0.0}"
NATS_MAX_PAYLOAD="${NATS_MAX_PAYLOAD:-8388608}"   # bytes; as launch/common.sh
NATS_MAX_PENDING="${NATS_MAX_PENDING:-1073741824}" # bytes buffered for one slow client; as launch/common.sh
export PYTHONPATH="$TRIAD_REPO${PYTHONPATH:+:$PYTHONPATH}"
READY_TIMEOUT="${READY_TIMEOUT:-900}"
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"
RUN_DIR="${RUN_DIR:-$PWD/triad-run-${SLURM_JOB_ID:-nojob}}"
NODE_TASK="$SCRIPT_DIR/node_task.sh"
PROBE=("$TRIAD_PYTHON" "$SCRIPT_DIR/wait_ready.py")

STEP_NAMES=()   # parallel arrays: one entry per srun step we started
STEP_PIDS=()
STEP_HEAD=()    # 1 for etcd/nats/frontend: losing one of them ends the deployment
READY=0

log() { echo "[triad_srun $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

check_env() {
    [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_JOB_NODELIST:-}" ]] ||
        die "not inside a Slurm allocation: run it with salloc or from an sbatch script"
    [[ -x "$TRIAD_PYTHON" ]] || die "TRIAD_PYTHON=$TRIAD_PYTHON is not executable; run setup.sh or set it"
    [[ -e "$MODEL" ]] || die "MODEL=$MODEL does not exist (it must be on a path every node sees)"
    case "$TOPOLOGY" in agg|disagg|epd) ;; *) die "TOPOLOGY=$TOPOLOGY: use agg, disagg or epd" ;; esac
    local n
    for n in NUM_AGG NUM_ENCODE NUM_PREFILL NUM_DECODE GPUS_PER_WORKER HTTP_PORT; do
        [[ "${!n:-1}" =~ ^[0-9]+$ ]] || die "$n=${!n} is not a whole number"
    done
    : "${TRIAD_NATS_BIN:=$(find_nats)}"
    export TRIAD_NATS_BIN TRIAD_ETCD_BIN="${TRIAD_ETCD_BIN:-etcd}"
}

find_nats() {
    local venv_bin; venv_bin="$(dirname "$TRIAD_PYTHON")/nats-server"
    if [[ -x "$venv_bin" ]]; then echo "$venv_bin"; else echo nats-server; fi
}

hostlist() { scontrol show hostnames "$1"; }

# ---- steps -------------------------------------------------------------------------------
# start_step NAME NODE IS_HEAD ENV... -- CMD...: one task on NODE, output to $RUN_DIR/logs/NAME.log
start_step() {
    local name="$1" node="$2" is_head="$3"; shift 3
    local -a envs=()
    while [[ "$1" != "--" ]]; do envs+=("$1"); shift; done
    shift
    # shellcheck disable=SC2086  # SRUN_ARGS is a list of words on purpose
    env "${envs[@]}" srun --overlap --nodes=1 --ntasks=1 --nodelist="$node" \
        --job-name="triad-$name" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
        "$@" >"$RUN_DIR/logs/$name.log" 2>&1 &
    STEP_NAMES+=("$name"); STEP_PIDS+=("$!"); STEP_HEAD+=("$is_head")
    echo "$! $node" >"$RUN_DIR/steps/$name.pid"
    log "started $name on $node (srun pid $!)"
}

alive() { kill -0 "$1" 2>/dev/null; }

# A step that ended: fatal while starting or for a head process; a warning for a worker later.
check_steps() {
    local i
    for i in "${!STEP_PIDS[@]}"; do
        [[ -n "${STEP_PIDS[$i]}" ]] && ! alive "${STEP_PIDS[$i]}" || continue
        local name="${STEP_NAMES[$i]}"
        log "step $name exited; last lines of $RUN_DIR/logs/$name.log:"
        tail -n 30 "$RUN_DIR/logs/$name.log" >&2 || true
        STEP_PIDS[i]=""
        if (( READY == 0 )) || [[ "${STEP_HEAD[$i]}" == 1 ]]; then die "$name exited"; fi
    done
}

# wait_for WHAT TIMEOUT PROBE_ARGS...: poll a wait_ready.py probe, failing fast if a step dies.
wait_for() {
    local what="$1" timeout="$2" start=$SECONDS; shift 2
    until "${PROBE[@]}" "$@" --timeout 1 2>/dev/null; do
        check_steps
        (( SECONDS - start < timeout )) || { "${PROBE[@]}" "$@" --timeout 1 || true; die "timed out after ${timeout}s waiting for $what"; }
        sleep 1
    done
    log "$what: ready after $(( SECONDS - start ))s"
}

# ---- stopping ----------------------------------------------------------------------------
step_id_of() {  # NAME -> jobid.stepid of our step of that name (empty if gone)
    timeout 20 squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>/dev/null | awk -v n="triad-$1" '$2 == n {print $1; exit}'
}

# stop_steps PATTERN: SIGTERM the matching srun processes (srun forwards it to the task), wait
# up to STOP_TIMEOUT, then scancel the steps still there and SIGKILL their srun processes.
stop_steps() {
    local pattern="$1" i deadline=$(( SECONDS + STOP_TIMEOUT )) step
    local -a mine=()
    for i in "${!STEP_NAMES[@]}"; do
        [[ "${STEP_NAMES[$i]}" == $pattern && -n "${STEP_PIDS[$i]}" ]] && mine+=("$i")
    done
    for i in "${mine[@]}"; do kill -TERM "${STEP_PIDS[$i]}" 2>/dev/null || true; done
    for i in "${mine[@]}"; do
        while alive "${STEP_PIDS[$i]}" && (( SECONDS < deadline )); do sleep 0.5; done
        if alive "${STEP_PIDS[$i]}"; then
            step=$(step_id_of "${STEP_NAMES[$i]}")
            log "${STEP_NAMES[$i]} did not stop in ${STOP_TIMEOUT}s: scancel ${step:-?}, kill ${STEP_PIDS[$i]}"
            [[ -n "$step" ]] && timeout 20 scancel --signal=KILL "$step" 2>/dev/null || true
            kill -KILL "${STEP_PIDS[$i]}" 2>/dev/null || true
        fi
        wait "${STEP_PIDS[$i]}" 2>/dev/null || true
        STEP_PIDS[i]=""
    done
}

cleanup() {
    local rc=$?
    trap '' INT TERM   # a second Ctrl-C must not cut the shutdown short
    trap - EXIT
    log "stopping (workers, then frontend, then NATS and etcd)"
    stop_steps 'w-*'
    stop_steps 'frontend'
    stop_steps 'nats'
    stop_steps 'etcd'
    rm -f "$RUN_DIR/triad_srun.pid"
    log "stopped"
    exit "$rc"
}

on_signal() { log "got $1"; exit 0; }

# ---- head --------------------------------------------------------------------------------
resolve_head_addr() {
    if [[ -n "${HEAD_ADDR:-}" ]]; then echo "$HEAD_ADDR"; return; fi
    timeout 60 srun --overlap --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" \
        --job-name=triad-addr "$NODE_TASK" addr
}

start_head() {
    local etcd_url="http://$HEAD_ADDR:$TRIAD_ETCD_PORT" peer_url="http://$HEAD_ADDR:$TRIAD_ETCD_PEER_PORT"
    start_step etcd "$HEAD_NODE" 1 -- "$NODE_TASK" etcd --name triad-head \
        --data-dir "$RUN_DIR/etcd-data" --listen-client-urls "$etcd_url" \
        --advertise-client-urls "$etcd_url" --listen-peer-urls "$peer_url" \
        --initial-advertise-peer-urls "$peer_url" --initial-cluster "triad-head=$peer_url" \
        --logger=zap
    # nats-server takes max_payload only from a config file
    printf 'listen: %s:%s\nmax_payload: %s\nmax_pending: %s\n' "$HEAD_ADDR" "$TRIAD_NATS_PORT" \
        "$NATS_MAX_PAYLOAD" "$NATS_MAX_PENDING" >"$RUN_DIR/nats.conf"
    start_step nats "$HEAD_NODE" 1 -- "$NODE_TASK" nats -c "$RUN_DIR/nats.conf"
    wait_for "etcd at $etcd_url" 60 http "$etcd_url/health"
    wait_for "nats at $NATS_SERVER" 60 tcp "$HEAD_ADDR" "$TRIAD_NATS_PORT"
    [[ "${CONTROL_PLANE_ONLY:-0}" == 1 ]] && return 0
    # shellcheck disable=SC2086
    start_step frontend "$HEAD_NODE" 1 -- "$NODE_TASK" frontend --host "$FRONTEND_HOST" \
        --http-port "$HTTP_PORT" --etcd-endpoints "$ETCD_ENDPOINTS" --nats-server "$NATS_SERVER" \
        ${FRONTEND_ARGS:-}
}

# ---- workers -----------------------------------------------------------------------------
declare -A NODE_SLOTS=()   # workers placed per node so far: the next worker's GPU slot there
EXPECT=""

roles_of_topology() {
    case "$TOPOLOGY" in
        agg) echo "agg:${NUM_AGG:-1}" ;;
        disagg) echo "prefill:${NUM_PREFILL:-1} decode:${NUM_DECODE:-1}" ;;
        epd) echo "encode:${NUM_ENCODE:-1} prefill:${NUM_PREFILL:-1} decode:${NUM_DECODE:-1}" ;;
    esac
}

start_role() {
    local role="$1" count="$2" var i node slot
    var="${role^^}_NODES"
    local -a nodes
    if [[ -n "${!var:-}" ]]; then mapfile -t nodes < <(hostlist "${!var}"); else nodes=("${WORKER_NODES[@]}"); fi
    (( ${#nodes[@]} > 0 )) || die "$var names no node"
    local -a extra=()
    if [[ -n "${SERVED_MODEL_NAME:-}" ]]; then extra+=(--served-model-name "$SERVED_MODEL_NAME"); fi
    for (( i = 0; i < count; i++ )); do
        node="${nodes[$(( i % ${#nodes[@]} ))]}"
        slot="${NODE_SLOTS[$node]:-0}"; NODE_SLOTS[$node]=$(( slot + 1 ))
        # shellcheck disable=SC2086
        start_step "w-$role-$i" "$node" 0 TRIAD_GPU_SLOT="$slot" -- "$NODE_TASK" worker \
            --role "$role" --model "$MODEL" --device "$DEVICE" --namespace "$TRIAD_NAMESPACE" \
            --etcd-endpoints "$ETCD_ENDPOINTS" --nats-server "$NATS_SERVER" "${extra[@]}" ${WORKER_ARGS:-}
    done
    EXPECT+="${EXPECT:+,}$role=$count"
}

start_workers() {
    local item
    for item in $(roles_of_topology); do
        if (( ${item#*:} > 0 )); then start_role "${item%%:*}" "${item#*:}"; fi
    done
    [[ -n "$EXPECT" ]] || die "TOPOLOGY=$TOPOLOGY with no workers: set NUM_* above 0"
}

record_steps() {  # jobid.stepid per step name, for `scancel` by hand
    timeout 20 squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' >"$RUN_DIR/steps.txt" 2>/dev/null || true
}

write_cluster_env() {  # `source RUN_DIR/cluster.env` to start more workers by hand (docs/deployment.md)
    cat >"$RUN_DIR/cluster.env" <<EOF
export SLURM_JOB_ID=$SLURM_JOB_ID ETCD_ENDPOINTS=$ETCD_ENDPOINTS NATS_SERVER=$NATS_SERVER
export TRIAD_NAMESPACE=$TRIAD_NAMESPACE TRIAD_PYTHON=$TRIAD_PYTHON MODEL=$MODEL DEVICE=$DEVICE
export GPUS_PER_WORKER=$GPUS_PER_WORKER${NODE_ADDR:+ NODE_ADDR=$NODE_ADDR}${TRIAD_LEASE_TTL:+ TRIAD_LEASE_TTL=$TRIAD_LEASE_TTL}
EOF
}

announce() {
    local base="http://$HEAD_ADDR:$HTTP_PORT" model
    if [[ -z "$EXPECT" ]]; then
        log "control plane up: ETCD_ENDPOINTS=$ETCD_ENDPOINTS NATS_SERVER=$NATS_SERVER; stop: kill -TERM $$"
        return
    fi
    model=$("${PROBE[@]}" model "$base" 2>/dev/null || true)
    cat >&2 <<EOF
================================================================================
Triad ($TOPOLOGY: $EXPECT) is up on job $SLURM_JOB_ID, head $HEAD_NODE.
  endpoint: $base/v1   (health: $base/health)
  curl $base/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "${model:-MODEL}", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'
  ETCD_ENDPOINTS=$ETCD_ENDPOINTS NATS_SERVER=$NATS_SERVER (also in $RUN_DIR/cluster.env)
  logs and step ids: $RUN_DIR   stop: kill -TERM $$  (or deploy/slurm/stop.sh $RUN_DIR)
================================================================================
EOF
}

main() {
    check_env
    mkdir -p "$RUN_DIR/logs" "$RUN_DIR/steps"
    echo $$ >"$RUN_DIR/triad_srun.pid"
    trap cleanup EXIT
    trap 'on_signal TERM' TERM
    trap 'on_signal INT' INT
    mapfile -t ALL_NODES < <(hostlist "$SLURM_JOB_NODELIST")
    HEAD_NODE="${HEAD_NODE:-${ALL_NODES[0]}}"
    WORKER_NODES=()
    local n
    for n in "${ALL_NODES[@]}"; do if [[ "$n" != "$HEAD_NODE" ]]; then WORKER_NODES+=("$n"); fi; done
    if [[ "${HEAD_RUNS_WORKERS:-0}" == 1 || ${#WORKER_NODES[@]} -eq 0 ]]; then WORKER_NODES+=("$HEAD_NODE"); fi
    HEAD_ADDR=$(resolve_head_addr) || die "cannot resolve the head node's address; set HEAD_ADDR"
    export ETCD_ENDPOINTS="http://$HEAD_ADDR:$TRIAD_ETCD_PORT" NATS_SERVER="nats://$HEAD_ADDR:$TRIAD_NATS_PORT"
    log "job $SLURM_JOB_ID: head $HEAD_NODE ($HEAD_ADDR), workers on ${WORKER_NODES[*]}, run dir $RUN_DIR"
    start_head
    if [[ "${CONTROL_PLANE_ONLY:-0}" != 1 ]]; then start_workers; fi
    if [[ -n "$EXPECT" ]]; then
        wait_for "workers ($EXPECT) in /health" "$READY_TIMEOUT" workers \
            "http://$HEAD_ADDR:$HTTP_PORT/health" --expect "$EXPECT"
    fi
    READY=1
    record_steps
    write_cluster_env
    announce
    touch "$RUN_DIR/ready"
    while true; do check_steps; sleep 2; done
}

main "$@"
