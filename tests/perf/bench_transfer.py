"""Pull bandwidth of common.transfer between two processes (this one pulls, a peer owns).

    .venv/bin/python tests/perf/bench_transfer.py [--sizes-mib 1 4 16 64 256] [--runs 5]

Prints, per size, the median and best pull time as GiB/s next to an in-process memcpy of the
same size (the ceiling on this machine), then a KV-cache pull (28 layers x 128 blocks): with
both sides contiguous (zero-copy) and with scattered block ids on both sides (gather + scatter),
with the UCX operation counts of each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from common.transfer import TransferAgent, TransferConfig  # noqa: E402
from tests.integration.transfer_peer import PeerProc, make_regions  # noqa: E402

KV_BLOCK = [28, 2, 16, 2, 16]  # [layers, 2, block_size, kv_heads, head_dim]


def kv_spec(block_ids: list[int], num_blocks: int) -> dict:
    return {"kind": "kv", "num_blocks": num_blocks, "block_shape": KV_BLOCK,
            "dtype": "bfloat16", "block_ids": block_ids, "seed": 3}

GIB = float(1 << 30)


def memcpy_gibs(nbytes: int, runs: int) -> float:
    a = torch.ones(nbytes, dtype=torch.uint8)
    b = torch.zeros_like(a)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / GIB


async def timed_pulls(agent: TransferAgent, addr: str, key: str, dst: list[torch.Tensor],
                      runs: int) -> list[float]:
    await agent.pull(addr, key, dst)  # warm-up: endpoint, page faults
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await agent.pull(addr, key, dst)
        times.append(time.perf_counter() - t0)
    return times


async def bench_sizes(agent: TransferAgent, peer: PeerProc, sizes: list[int], runs: int) -> None:
    print(f"{'size':>8} {'median GiB/s':>13} {'best GiB/s':>11} {'memcpy GiB/s':>13}")
    for mib in sizes:
        nbytes = mib << 20
        await peer.call(cmd="register", key=f"s{mib}", spec={"kind": "flat", "nbytes": nbytes,
                                                           "seed": mib}, timeout=120.0)
        dst = [torch.zeros(nbytes, dtype=torch.uint8)]
        times = await timed_pulls(agent, peer.address, f"s{mib}", dst, runs)
        print(f"{mib:>5} MiB {nbytes / statistics.median(times) / GIB:>13.2f} "
              f"{nbytes / min(times) / GIB:>11.2f} {memcpy_gibs(nbytes, runs):>13.2f}")
        await agent.release(peer.address, f"s{mib}")


async def bench_kv(agent: TransferAgent, peer: PeerProc, runs: int) -> None:
    cases = {"contiguous": (list(range(128)), list(range(64, 192))),
             "scattered": (list(range(0, 256, 2)), list(range(255, 0, -2)))}
    for name, (src, dst_ids) in cases.items():
        spec = kv_spec(src, num_blocks=256)
        await peer.call(cmd="register", key=name, spec=spec, timeout=120.0)
        cache = torch.zeros(256, *KV_BLOCK, dtype=torch.bfloat16)
        dst = [cache[b] for b in dst_ids]
        ops0 = (agent.stats.pull_data_ops, agent.stats.pull_control_ops)
        times = await timed_pulls(agent, peer.address, name, dst, runs)
        ops = ((agent.stats.pull_data_ops - ops0[0]) // (runs + 1),
               (agent.stats.pull_control_ops - ops0[1]) // (runs + 1))
        nbytes = sum(t.numel() * t.element_size() for t in dst)
        ok = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bf16 NaNs != NaNs
                 for a, b in zip(dst, make_regions(spec)))
        print(f"KV 28 layers x 128 blocks ({nbytes / 2**20:.1f} MiB, {name}): "
              f"median {statistics.median(times) * 1e3:.2f} ms = "
              f"{nbytes / statistics.median(times) / GIB:.2f} GiB/s; UCX ops per pull: "
              f"{ops[0]} data + {ops[1]} control; bit-exact: {ok}")
        await agent.release(peer.address, name)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    agent = TransferAgent(TransferConfig(op_timeout_s=60.0))
    await agent.start()
    peer = await PeerProc.start("--timeout", "60")
    try:
        await bench_sizes(agent, peer, args.sizes_mib, args.runs)
        await bench_kv(agent, peer, args.runs)
    finally:
        await peer.stop()
        await agent.close()


if __name__ == "__main__":
    asyncio.run(main())
