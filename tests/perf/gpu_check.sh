#!/usr/bin/env bash
# GPU tests + engine benchmark, in one go on a CUDA machine (the lent GPU: see docs/gpu-notes.md).
#   tests/perf/gpu_check.sh [bench_engine.py args...]
# Logs and JSON go to $OUT (the device tool's output folder) or ./gpu_out.
# Packages the GPU image lacks (pydantic, for common.protocol; ucxx) travel in .whl/serve and
# .whl/ucx (tests/perf/make_device_bundle.sh; see tests/perf/gpu_env.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
. tests/perf/gpu_env.sh
gpu_python_path python3 || exit 1
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
