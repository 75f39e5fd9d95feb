#!/usr/bin/env bash
# Runs as the single task of one `srun` step, on the node that step landed on; triad_srun.sh
# starts every Triad process through it:
#   node_task.sh worker ARGS...    -> python -m workers --advertise-host <this node's address> ARGS...
#   node_task.sh frontend ARGS...  -> python -m frontend ARGS...
#   node_task.sh etcd|nats ARGS... -> the server binary
#   node_task.sh addr              -> print this node's address (used to find the head's address)
#
# A node's address: $NODE_ADDR if set (one value for every node: only for single-host test
# clusters), else the first non-loopback address `getent hosts $SLURMD_NODENAME` gives (Debian maps
# a host's own name to 127.0.1.1, which other nodes cannot reach), else the first of `hostname -I`.
#
# GPUs: with GPUS_PER_WORKER=G > 0, the worker with per-node slot S (TRIAD_GPU_SLOT, set by
# triad_srun.sh) gets entries S*G .. S*G+G-1 of the step's CUDA_VISIBLE_DEVICES (or of 0..N-1 when
# Slurm set none), so workers sharing a node never share a GPU.
set -euo pipefail

node_addr() {
    if [[ -n "${NODE_ADDR:-}" ]]; then echo "$NODE_ADDR"; return; fi
    local name="${SLURMD_NODENAME:-$(hostname)}" addr
    addr=$(getent ahostsv4 "$name" 2>/dev/null | awk '$1 !~ /^127\./ {print $1; exit}' || true)
    [[ -z "$addr" ]] && addr=$(hostname -I 2>/dev/null | awk '{print $1}')
    [[ -n "$addr" ]] || { echo "node_task.sh: cannot find an address for $name; set NODE_ADDR" >&2; exit 2; }
    echo "$addr"
}

pick_gpus() {
    local per="${GPUS_PER_WORKER:-0}" slot="${TRIAD_GPU_SLOT:-0}"
    (( per > 0 )) || return 0
    local -a all
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        IFS=, read -r -a all <<< "$CUDA_VISIBLE_DEVICES"
    else
        mapfile -t all < <(seq 0 $(( ${GPUS_PER_NODE:-8} - 1 )))
    fi
    local first=$(( slot * per ))
    if (( first + per > ${#all[@]} )); then
        echo "node_task.sh: worker slot $slot needs GPUs $first..$((first + per - 1)) but this node" \
             "has ${#all[@]} (${all[*]}); lower the workers per node or GPUS_PER_WORKER" >&2
        exit 2
    fi
    local IFS=,
    export CUDA_VISIBLE_DEVICES="${all[*]:first:per}"
}

kind="${1:?usage: node_task.sh worker|frontend|etcd|nats|addr ARGS...}"
shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${TRIAD_PYTHON:-$repo/.venv/bin/python}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
case "$kind" in
    addr) node_addr ;;
    worker)
        addr=$(node_addr)
        pick_gpus
        export TRIAD_ADVERTISE_HOST="$addr"
        echo "node_task.sh: worker on ${SLURMD_NODENAME:-?} addr=$addr gpus=${CUDA_VISIBLE_DEVICES:-none}" >&2
        # ours first: an --advertise-host the caller passes comes later and wins
        exec "$python" -m workers --advertise-host "$addr" "$@" ;;
    frontend) exec "$python" -m frontend "$@" ;;
    # etcd reads every ETCD_* variable as a flag: give it none of ours.
    etcd) exec env -u ETCD_ENDPOINTS "${TRIAD_ETCD_BIN:-etcd}" "$@" ;;
    nats) exec "${TRIAD_NATS_BIN:-nats-server}" "$@" ;;
    *) echo "node_task.sh: unknown kind $kind" >&2; exit 2 ;;
esac
