#!/usr/bin/env bash
# Build the git-ignored .whl/ folders the GPU scripts carry to the device machine (it has no
# registry; its python3 is 3.12 with torch, triton, transformers, numpy, PIL, cuda-bindings):
#   .whl/serve  the serving stack's pure-Python and cp312 wheels the GPU image lacks (~12 MB)
#   .whl/bin    etcd and nats-server, gzip-compressed (~15 MB)
#   .whl/ucx    ucxx + libucx + rmm for CUDA 13, unpacked, trimmed (no static libs, headers or
#               perftest; duplicate .so copies made symlinks) and packed as one tar.xz (~6 MB,
#               against ~55 MB of wheels: the device call carries at most 64 MiB)
#   tests/perf/make_device_bundle.sh      (run from anywhere; needs pip, network to the registry)
set -euo pipefail
cd "$(dirname "$0")/../.."
dl() {  # dest packages...: wheels for CPython 3.12 on manylinux x86-64, no dependencies
    local dest=$1; shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$dest" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
rm -rf .whl/serve .whl/bin .whl/ucx
mkdir -p .whl/serve .whl/bin .whl/ucx
dl .whl/serve fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 pydantic==2.14.3 \
    pydantic_core==2.50.4 nats-py==2.16.0 etcd3aio==0.3.0 grpcio==1.85.1 protobuf==7.36.2 \
    typing_extensions==4.16.0 typing-inspection==0.4.5 annotated-types==0.8.0 annotated-doc==0.0.7 \
    opentelemetry-api==1.45.2 anyio==4.16.0 click==8.5.1 h11==0.16.0 idna==3.20
etcd_bin=$(command -v etcd || echo /usr/bin/etcd)
gzip -9 -c "$etcd_bin" >.whl/bin/etcd.gz
gzip -9 -c .venv/bin/nats-server >.whl/bin/nats-server.gz
tmp=$(mktemp -d)
dl "$tmp/w" ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 "libucx-cu13>=1.19,<1.22" "rmm-cu13==26.10.*" \
    "librmm-cu13==26.10.*" "rapids-logger==0.3.*"
mkdir "$tmp/site"
for w in "$tmp"/w/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
find "$tmp/site" -name '*.a' -delete
rm -rf "$tmp"/site/libucx/bin "$tmp"/site/libucx/lib/ucx/libucx_perftest* "$tmp"/site/*/include
python3 - "$tmp/site" <<'PY'
import collections, hashlib, os, sys
groups = collections.defaultdict(list)
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        p = os.path.join(root, f)
        if ".so" in f and not os.path.islink(p):
            groups[(root, hashlib.sha256(open(p, "rb").read()).hexdigest())].append(f)
for (root, _), names in groups.items():
    keep, *dups = sorted(names, key=len, reverse=True)
    for d in dups:
        os.remove(os.path.join(root, d))
        os.symlink(keep, os.path.join(root, d))
PY
tar -cJf .whl/ucx/ucxsite.tar.xz -C "$tmp/site" .
rm -rf "$tmp"
du -sh .whl/*
