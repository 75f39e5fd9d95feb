#!/usr/bin/env bash
# Serving benchmark on a CUDA machine (the lent GPU): a topology through HTTP, with the
# Qwen2.5-VL-7B shapes in bf16 and dummy weights, measured by the project's bench client.
#   tests/perf/gpu_serve.sh            # everything; results in $OUT (the device tool's folder)
# Steps:
#   1. put the Python packages the GPU image lacks on PYTHONPATH (tests/perf/gpu_env.sh): wheels
#      carried in .whl/serve (fastapi, uvicorn, pydantic, nats-py, etcd3aio, grpcio, protobuf, ...)
#      installed into /tmp/site, and ucxx for CUDA from .whl/ucx (E/P/D);
#   2. unpack etcd and nats-server carried gzip-compressed in .whl/bin onto PATH;
#   3. write the weightless 7B model dir (tools/configs/dummy_model_dir.py);
#   4. start launch/$LAUNCHER.sh (its own etcd + NATS on free ports) and wait until it is ready;
#   5. bench client: (a) TTFT, 1 image 512x512 + 1000 text tokens, 16 out, concurrency 1;
#      (b) throughput, 1000 text tokens in / 1000 out, concurrency 64 and 128;
#      (c) as (b) with 1 image 512x512 per request, if time is left;
#      (ttft_text, not in the default list: as (a) without the image);
#   6. stop the launcher by PID; print CPU seconds per process for each phase; save the warnings
#      and errors of every process's log to $OUT/logs.txt.
# Knobs: PHASES="ttft tput tput_img", TPUT_PROMPTS (per level), WORKER_EXTRA (more worker flags);
#   NAME (prefix of the result files), LAUNCHER=agg|disagg|epd (all workers on the one GPU),
#   RESULTS (folder for the JSON and logs; default $OUT), DEADLINE_EPOCH (absolute end, date +%s,
#   for several runs in one device call), PY_SWITCH_INTERVAL (seconds; sys.setswitchinterval in
#   every Python process, through a sitecustomize on PYTHONPATH);
# for a CPU dry run: PY=.venv/bin/python SKIP_WHEELS=1 DEVICE_ARGS="--device cpu" CONFIG=<tiny config>
#   SIZE_ARGS="--max-num-seqs 8 --kv-cache-mb 64" (SIZE_ARGS replaces the engine sizing flags).
# The carried folders (git-ignored; ~32 MB; device tool: carry=[".whl/serve", ".whl/bin",
#   ".whl/ucx"]) are made here by tests/perf/make_device_bundle.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_serve_out}
RESULTS=${RESULTS:-$OUT}
NAME=${NAME:-agg}
LAUNCHER=${LAUNCHER:-agg}
mkdir -p "$OUT" "$RESULTS"
PY=${PY:-$(command -v python3)}
CONFIG=${CONFIG:-tools/configs/qwen2_5_vl_7b.json}
DEVICE_ARGS=${DEVICE_ARGS:-"--device cuda --dtype bfloat16"}
PHASES=${PHASES:-"ttft tput tput_img"}
TPUT_PROMPTS=${TPUT_PROMPTS:-256}
DEADLINE=$((SECONDS + ${TIME_BUDGET_S:-560}))  # the device call's limit is 600 s
if [ -n "${DEADLINE_EPOCH:-}" ]; then DEADLINE=$((SECONDS + DEADLINE_EPOCH - $(date +%s))); fi
MODEL_DIR=${MODEL_DIR:-/tmp/qwen2_5_vl_7b_dummy}
RUN_DIR=/tmp/triad-run-$NAME
LAUNCH_LOG=/tmp/triad-launch-$NAME.log  # kept out of $OUT: at most 8 files come back
LAUNCH_PID=""

say() { echo "[gpu_serve $(date +%H:%M:%S) +${SECONDS}s] $*"; }

install_wheels() {
    . tests/perf/gpu_env.sh
    gpu_python_path "$PY" || return 1
    if [ -n "${PY_SWITCH_INTERVAL:-}" ]; then
        mkdir -p /tmp/triad-swi
        echo "import sys; sys.setswitchinterval($PY_SWITCH_INTERVAL)" >/tmp/triad-swi/sitecustomize.py
        export PYTHONPATH=/tmp/triad-swi${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
}

unpack_binaries() {
    mkdir -p /tmp/triad-bin
    local b
    for b in etcd nats-server; do
        if [ -f ".whl/bin/$b.gz" ]; then gunzip -c ".whl/bin/$b.gz" >"/tmp/triad-bin/$b"; chmod +x "/tmp/triad-bin/$b"; fi
    done
    if ! command -v curl >/dev/null; then  # launch/common.sh polls health with curl
        cat >/tmp/triad-bin/curl <<'EOF'
#!/usr/bin/env python3
"""Enough of curl for launch/common.sh: curl [-s] [-f] [--max-time N] URL (GET, body to stdout)."""
import sys, urllib.request
args, timeout, url = sys.argv[1:], 10.0, None
while args:
    a = args.pop(0)
    if a == "--max-time": timeout = float(args.pop(0))
    elif not a.startswith("-"): url = a
try:
    sys.stdout.write(urllib.request.urlopen(url, timeout=timeout).read().decode())
except Exception:
    sys.exit(22)
EOF
        chmod +x /tmp/triad-bin/curl
    fi
    export PATH="/tmp/triad-bin:$PATH"
}

environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import sys, torch, transformers, fastapi, uvicorn, pydantic, nats, etcd3aio, grpc, google.protobuf as pb
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__,
      'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'pydantic', pydantic.__version__,
      'grpcio', grpc.__version__, 'protobuf', pb.__version__)
import importlib.util; print('ucxx importable:', importlib.util.find_spec('ucxx') is not None)"
    etcd --version | head -1; nats-server --version; nproc
}

cpu_seconds() {  # label: CPU seconds (user+sys, all threads) of each process the launcher started
    local tick name pid
    tick=$(getconf CLK_TCK)
    [ -f "$RUN_DIR/pids" ] || return 0
    while read -r name pid; do  # /proc/PID/stat fields 14, 15: utime, stime (comm has no spaces here)
        awk -v n="$name" -v t="$tick" -v l="$1" '{printf "cpu[%s] %s %.1f s\n", l, n, ($14 + $15) / t}' \
            "/proc/$pid/stat" 2>/dev/null
    done <"$RUN_DIR/pids"
}

start_cluster() {
    local port
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    BASE_URL="http://127.0.0.1:$port"
    rm -rf "$RUN_DIR"
    unset ETCD_ENDPOINTS NATS_SERVER
    MODEL=$MODEL_DIR HTTP_PORT=$port TRIAD_PYTHON=$PY TRIAD_RUN_DIR=$RUN_DIR STARTUP_TIMEOUT=420 \
    WORKER_ARGS="$DEVICE_ARGS --load-format dummy ${SIZE_ARGS:---max-num-seqs 128 \
--max-num-batched-tokens 8192 --max-model-len 4096 --kv-cache-mb 32768} ${WORKER_EXTRA:-}" \
        setsid bash "launch/$LAUNCHER.sh" >"$LAUNCH_LOG" 2>&1 </dev/null &
    LAUNCH_PID=$!
    say "launcher pid $LAUNCH_PID, $BASE_URL"
    until grep -q "TRIAD READY" "$LAUNCH_LOG"; do
        kill -0 "$LAUNCH_PID" 2>/dev/null || { say "launcher exited during start-up"; return 1; }
        [ "$SECONDS" -lt "$DEADLINE" ] || { say "not ready in time"; return 1; }
        sleep 1
    done
    say "cluster ready"
}

stop_cluster() {
    [ -n "$LAUNCH_PID" ] || return 0
    kill -TERM "$LAUNCH_PID" 2>/dev/null
    local i
    for i in $(seq 1 60); do kill -0 "$LAUNCH_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$LAUNCH_PID" 2>/dev/null && kill -KILL -- "-$LAUNCH_PID" 2>/dev/null
    LAUNCH_PID=""
    say "launcher stopped"
}

bench() {  # name max_seconds bench-client args...
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - SECONDS - 20))
    if [ "$left" -lt 30 ]; then say "skip $name: ${left}s left"; return 0; fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "bench $name (limit ${limit}s)"
    cpu_seconds "before $name"
    local f lines=/tmp/triad-lines-$NAME-$name
    for f in "$RUN_DIR"/*.log; do echo "$f $(wc -l <"$f")"; done >"$lines"
    timeout "$limit" "$PY" -m tools.bench.serve --base-url "$BASE_URL" --tokenizer "$MODEL_DIR" \
        --result-json "$RESULTS/$NAME-$name.json" "$@"
    say "bench $name exit $?"
    cpu_seconds "after $name"
    phase_timing "$name" "$lines"
}

phase_timing() {  # name lines-file: per-stage TTFT table of the log lines this phase wrote
    local dir=/tmp/triad-phase-$NAME-$1 f n
    rm -rf "$dir"; mkdir -p "$dir"
    while read -r f n; do tail -n +"$((n + 1))" "$f" >"$dir/$(basename "$f")"; done <"$2"
    "$PY" tests/perf/timing_report.py "$dir"/*.log --json "$RESULTS/$NAME-$1-timing.json"
    for f in "$dir"/*-[0-9].log; do  # each worker's last step-time line of this phase
        grep -h "engine: " "$f" | tail -n 1 | sed "s|^|$(basename "$f" .log) |"
    done
}

run_phases() {
    local p
    for p in $PHASES; do
        case $p in
            ttft) bench ttft 120 --num-prompts 20 --concurrency 1 --warmup 3 --images-per-request 1 \
                      --image-size 512x512 --input-tokens 1000 --output-tokens 16 ;;
            ttft_text) bench ttft_text 60 --num-prompts 20 --concurrency 1 --warmup 3 --images-per-request 0 \
                      --input-tokens 1000 --output-tokens 16 ;;
            tput) bench tput 240 --num-prompts "$TPUT_PROMPTS" --concurrency 64,128 --warmup 8 \
                      --images-per-request 0 --input-tokens 1000 --output-tokens 1000 --plot "$RESULTS/$NAME-tput.png" ;;
            tput_img) bench tput_img 200 --num-prompts "$TPUT_PROMPTS" --concurrency 64,128 --warmup 4 \
                      --images-per-request 1 --image-size 512x512 --input-tokens 1000 --output-tokens 1000 \
                      --plot "$RESULTS/$NAME-tput_img.png" ;;
        esac
    done
}

main() {
    trap stop_cluster EXIT
    install_wheels || { say "wheel install failed"; return 1; }
    unpack_binaries
    environment
    "$PY" -m tools.configs.dummy_model_dir "$CONFIG" "$MODEL_DIR" || return 1
    start_cluster || { tail -n 80 "$LAUNCH_LOG"; save_logs; return 1; }
    run_phases
    curl -s "$BASE_URL/metrics" | grep -v "^#" >"$RUN_DIR/metrics.log" 2>/dev/null
    stop_cluster
    save_logs
}

save_logs() {  # warnings and errors of every process (NATS slow consumers, worker/frontend errors)
    local f
    {
        for f in "$RUN_DIR"/*.log; do
            echo "===== $(basename "$f")"
            grep -iE "error|warn|slow|exception|ready|loading" "$f" | tail -n 40
        done
        echo "===== launcher"; tail -n 30 "$LAUNCH_LOG"
        echo "===== frontend /metrics"; grep -E "^triad_(requests|prompt|completion)" "$RUN_DIR/metrics.log"
    } >"$RESULTS/$NAME-logs.txt" 2>&1
    grep -c . "$RESULTS/$NAME-logs.txt" | sed 's/^/log lines saved: /'
    tar -czf "$RESULTS/$NAME-runlogs.tgz" -C "$RUN_DIR" --exclude=etcd-data . 2>/dev/null
}

main 2>&1 | tee "$RESULTS/$NAME-serve.log"
exit "${PIPESTATUS[0]}"
