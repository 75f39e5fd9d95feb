#!/usr/bin/env bash
# GPU tests + engine benchmark, in one go on a CUDA machine (the lent H100: see docs/gpu-notes.md).
#   tests/perf/gpu_check.sh [bench_engine.py args...]
# Logs and JSON go to $OUT (the device tool's output folder) or ./gpu_out.
# Packages the GPU image lacks (pydantic, for common.protocol) travel as wheels in .whl/serve
# (tests/perf/make_device_bundle.sh) or, as before, .whl/engine.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
WHEELS=$(ls -d .whl/serve .whl/engine 2>/dev/null | head -n 1)
if [ -n "$WHEELS" ] && ! python3 -c "import pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import inspect, torch, triton, transformers; from torch.nn.attention.varlen import varlen_attn; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__); print('varlen_attn', inspect.signature(varlen_attn))" | tee -a "$OUT/gpu.txt"
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
    timeout 420 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee "$OUT/tests.log"
    status=${PIPESTATUS[0]}
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    timeout 480 python3 tests/perf/bench_engine.py --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status
