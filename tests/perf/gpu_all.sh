#!/usr/bin/env bash
# Everything issue 5 measures on a CUDA machine, in one device call, within one deadline:
#   STEPS="tests engine agg epd" tests/perf/gpu_all.sh
# Steps (each skipped when the deadline is too close):
#   tests   tests/gpu (GPU numerics against the CPU reference)            -> gpu-tests.log
#   engine  tests/perf/bench_engine.py (no HTTP; ENGINE_ARGS)              -> engine.json, engine.log
#   agg     tests/perf/gpu_serve.sh, agg topology (AGG_PHASES)             -> agg-*.json, agg-*-timing.json
#   epd     tests/perf/gpu_serve.sh, E/P/D on the one GPU (EPD_PHASES)     -> epd-*.json, epd-*-timing.json
# Everything lands in $RESULTS (/tmp/gpu-results) and is packed into $OUT/results.tgz at the end
# (the device tool returns at most 8 files). Carry .whl/serve, .whl/bin and .whl/ucx, made here by
# tests/perf/make_device_bundle.sh. Knobs: TOTAL_S (default 570: the call's limit is 600 s).
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/gpu_out} RESULTS=${RESULTS:-/tmp/gpu-results}
export DEADLINE_EPOCH=$(( $(date +%s) + ${TOTAL_S:-570} ))
STEPS=${STEPS:-"tests engine agg epd"}
mkdir -p "$OUT" "$RESULTS"
left() { echo $(( DEADLINE_EPOCH - $(date +%s) )); }
say() { echo "[gpu_all $(date +%H:%M:%S) left $(left)s] $*"; }

setup_python() {  # the serve wheels give the engine's pydantic too; ucxx for E/P/D and tests
    . tests/perf/gpu_env.sh
    gpu_python_path python3 || say "installing the carried wheels failed"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
}

step_tests() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$RESULTS/gpu.txt"
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$RESULTS/gpu.txt"
    timeout "$(( $(left) - 30 ))" python3 -m pytest -q -x -rA -p no:cacheprovider -o addopts="" tests/gpu \
        2>&1 | tee "$RESULTS/gpu-tests.log" | tail -n 15
}

step_engine() {
    # shellcheck disable=SC2086  # ENGINE_ARGS is a word list
    timeout "$(( $(left) - 20 ))" python3 tests/perf/bench_engine.py --out "$RESULTS/engine.json" \
        ${ENGINE_ARGS:-} 2>&1 | tee "$RESULTS/engine.log" | tail -n 30
}

step_serve() {  # name launcher phases
    NAME=$1 LAUNCHER=$2 PHASES=$3 bash tests/perf/gpu_serve.sh 2>&1 \
        | grep -E "^ +[0-9]+ +[0-9]+/|^(agg|frontend|encode|prefill|decode) \(|tensor transfer|cpu\[after|exit|engine:|not ready|skip" \
        | tail -n 60
}

main() {
    setup_python
    local s
    for s in $STEPS; do
        if [ "$(left)" -lt 45 ]; then say "skip $s: too little time left"; continue; fi
        say "step $s"
        case $s in
            tests) step_tests ;;
            engine) step_engine ;;
            agg) step_serve agg agg "${AGG_PHASES:-ttft ttft_text tput tput_img}" ;;
            epd) step_serve epd epd "${EPD_PHASES:-ttft tput_img}" ;;
        esac
    done
    tar -czf "$OUT/results.tgz" -C "$RESULTS" .
    say "done; results in \$OUT/results.tgz"
}

main
