# Sourced by the GPU scripts (gpu_all.sh, gpu_serve.sh, gpu_check.sh) from the repository root:
#   . tests/perf/gpu_env.sh && gpu_python_path [python]
# puts what the GPU image lacks on PYTHONPATH, from the carried bundle
# (tests/perf/make_device_bundle.sh): the .whl/serve wheels, installed into /tmp/site once per
# wheel set (~10 s), and ucxx + libucx for CUDA 13, unpacked from .whl/ucx into /tmp/ucxsite.
# SKIP_WHEELS=1 (a CPU dry run with the project's venv) skips both. Returns 1 if a step failed.
gpu_python_path() {
    local py=${1:-python3} stamp
    [ -n "${SKIP_WHEELS:-}" ] && return 0
    if ls .whl/serve/*.whl >/dev/null 2>&1; then
        stamp="/tmp/site/.triad-$(ls .whl/serve | md5sum | cut -c1-12)"
        [ -f "$stamp" ] || { "$py" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target /tmp/site .whl/serve/*.whl && touch "$stamp"; } || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [ -f .whl/ucx/ucxsite.tar.xz ]; then
        [ -d /tmp/ucxsite ] || { mkdir -p /tmp/ucxsite \
            && tar -xJf .whl/ucx/ucxsite.tar.xz -C /tmp/ucxsite; } || return 1
        export PYTHONPATH=/tmp/ucxsite${PYTHONPATH:+:$PYTHONPATH}
    fi
}
