"""Pull bandwidth of common.transfer between two processes (this one pulls, a peer owns).

    .venv/bin/python tests/perf/bench_transfer.py [--sizes-mib 1 4 16 64 256] [--runs 5]
        [--pairs 1] [--cpus 0]
    .venv/bin/python tests/perf/bench_transfer.py --latency [--latency-kib 4 256 2048]
        [--runs 200] [--gap-ms 0]

Prints, per size, the median and best pull time as GiB/s next to an in-process memcpy of the
same size (the ceiling on this machine), then a KV-cache pull (28 layers x 128 blocks): with
both sides contiguous (zero-copy) and with scattered block ids on both sides (gather + scatter),
with the UCX operation counts of each.

``--pairs N`` repeats the size sweep with N fresh agent + peer pairs (one line each, then the
median over pairs and how many pairs fell below ``--slow-gibs``), the way to count how often
the slow mode shows. ``--cpus 0`` pins both processes to those CPUs (``--cpus 0`` = one core:
the worst case for the shared-memory pipeline, see common/transfer_ucx.py).

``--latency`` measures the fixed cost of a pull instead: per size (``--latency-kib``,
contiguous on both sides), ``--runs`` sequential pulls (default 200) after a warm-up, printed
as p50 / p90 / min in microseconds with the UCX operations per pull; ``--gap-ms`` idles
before each pull, as in serving (threads asleep, caches cold).
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
# Warm-up pulls move at least this much first: UCX's shared-memory FIFO (8 MiB) is fresh memory
# that page-faults the first time each slot is used; small pulls would otherwise measure that.
WARMUP_BYTES = 16 << 20


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
    nbytes = sum(t.numel() * t.element_size() for t in dst)
    for _ in range(-(-WARMUP_BYTES // nbytes)):  # warm-up: endpoint, page faults
        await agent.pull(addr, key, dst)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await agent.pull(addr, key, dst)
        times.append(time.perf_counter() - t0)
    return times


async def size_times(agent: TransferAgent, peer: PeerProc, mib: int,
                     runs: int) -> list[float]:
    nbytes = mib << 20
    await peer.call(cmd="register", key=f"s{mib}", spec={"kind": "flat", "nbytes": nbytes,
                                                       "seed": mib}, timeout=120.0)
    dst = [torch.zeros(nbytes, dtype=torch.uint8)]
    times = await timed_pulls(agent, peer.address, f"s{mib}", dst, runs)
    await agent.release(peer.address, f"s{mib}")
    return times


async def bench_sizes(agent: TransferAgent, peer: PeerProc, sizes: list[int], runs: int) -> None:
    print(f"{'size':>8} {'median GiB/s':>13} {'best GiB/s':>11} {'memcpy GiB/s':>13}")
    for mib in sizes:
        times = await size_times(agent, peer, mib, runs)
        nbytes = mib << 20
        print(f"{mib:>5} MiB {nbytes / statistics.median(times) / GIB:>13.2f} "
              f"{nbytes / min(times) / GIB:>11.2f} {memcpy_gibs(nbytes, runs):>13.2f}")


async def one_pair(sizes: list[int], runs: int, kick_us: float) -> list[float]:
    """Median GiB/s per size, with a fresh agent and a fresh peer process."""
    agent, peer = await start_pair(kick_us)
    try:
        return [(mib << 20) / statistics.median(await size_times(agent, peer, mib, runs)) / GIB
                for mib in sizes]
    finally:
        await peer.stop()
        await agent.close()


async def bench_pairs(sizes: list[int], runs: int, pairs: int, slow: float,
                      kick_us: float) -> None:
    print("pair  " + "".join(f"{f'{mib} MiB':>9}" for mib in sizes) + "   (median GiB/s)")
    rows = []
    for i in range(pairs):
        rows.append(await one_pair(sizes, runs, kick_us))
        print(f"{i:>4}  " + "".join(f"{g:>9.2f}" for g in rows[-1]) +
              f"   memcpy 64 MiB {memcpy_gibs(64 << 20, runs):.1f}", flush=True)
    cols = list(zip(*rows))
    print("median" + "".join(f"{statistics.median(c):>9.2f}" for c in cols))
    print(f"< {slow}" + "".join(f"{sum(g < slow for g in c):>7}/{pairs}" for c in cols))


async def bench_kv(agent: TransferAgent, peer: PeerProc, runs: int) -> None:
    cases = {"contiguous": (list(range(128)), list(range(64, 192))),
             "scattered": (list(range(0, 256, 2)), list(range(255, 0, -2)))}
    for name, (src, dst_ids) in cases.items():
        spec = kv_spec(src, num_blocks=256)
        await peer.call(cmd="register", key=name, spec=spec, timeout=120.0)
        cache = torch.zeros(256, *KV_BLOCK, dtype=torch.bfloat16)
        dst = [cache[b] for b in dst_ids]
        ops0 = (agent.stats.pull_data_ops, agent.stats.pull_control_ops)
        pulls0 = agent.stats.pulls
        times = await timed_pulls(agent, peer.address, name, dst, runs)
        pulls = agent.stats.pulls - pulls0
        ops = ((agent.stats.pull_data_ops - ops0[0]) // pulls,
               (agent.stats.pull_control_ops - ops0[1]) // pulls)
        nbytes = sum(t.numel() * t.element_size() for t in dst)
        ok = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bf16 NaNs != NaNs
                 for a, b in zip(dst, make_regions(spec)))
        print(f"KV 28 layers x 128 blocks ({nbytes / 2**20:.1f} MiB, {name}): "
              f"median {statistics.median(times) * 1e3:.2f} ms = "
              f"{nbytes / statistics.median(times) / GIB:.2f} GiB/s; UCX ops per pull: "
              f"{ops[0]} data + {ops[1]} control; bit-exact: {ok}")
        await agent.release(peer.address, name)


async def bench_latency(agent: TransferAgent, peer: PeerProc, sizes_kib: list[int],
                        runs: int, gap_s: float) -> None:
    """Sequential pulls of small contiguous tensors: the fixed cost of one pull.

    ``gap_s`` > 0 idles between pulls, as in serving: every thread on the path is asleep when a
    pull starts, and its caches are cold.
    """
    print(f"{'size':>9} {'p50 us':>8} {'p90 us':>8} {'min us':>8}   UCX ops per pull")
    for kib in sizes_kib:
        nbytes = kib << 10
        key = f"lat{kib}"
        await peer.call(cmd="register", key=key, spec={"kind": "flat", "nbytes": nbytes,
                                                        "seed": kib}, timeout=120.0)
        dst = [torch.zeros(nbytes, dtype=torch.uint8)]
        for _ in range(max(20, -(-WARMUP_BYTES // nbytes))):  # endpoint, cold FIFO slots
            await agent.pull(peer.address, key, dst)
        s0 = (agent.stats.pulls, agent.stats.pull_data_ops, agent.stats.pull_control_ops)
        times = []
        for _ in range(runs):
            if gap_s:
                await asyncio.sleep(gap_s)
            t0 = time.perf_counter()
            await agent.pull(peer.address, key, dst)
            times.append(time.perf_counter() - t0)
        pulls = agent.stats.pulls - s0[0]
        ops = ((agent.stats.pull_data_ops - s0[1]) / pulls,
               (agent.stats.pull_control_ops - s0[2]) / pulls)
        us = sorted(t * 1e6 for t in times)
        ok = torch.equal(dst[0], make_regions({"kind": "flat", "nbytes": nbytes, "seed": kib})[0])
        print(f"{kib:>5} KiB {us[len(us) // 2]:>8.0f} {us[int(len(us) * 0.9)]:>8.0f} "
              f"{us[0]:>8.0f}   {ops[0]:g} data + {ops[1]:g} control; bit-exact: {ok}",
              flush=True)
        await agent.release(peer.address, key)


async def start_pair(kick_us: float) -> tuple[TransferAgent, PeerProc]:
    agent = TransferAgent(TransferConfig(op_timeout_s=60.0, kick_interval_us=kick_us))
    await agent.start()
    try:
        return agent, await PeerProc.start("--timeout", "60", "--kick-us", str(kick_us))
    except BaseException:
        await agent.close()
        raise


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--runs", type=int, help="pulls per size (default 5; 200 with --latency)")
    ap.add_argument("--latency", action="store_true",
                    help="fixed cost per pull: p50/p90/min of sequential small pulls")
    ap.add_argument("--latency-kib", type=int, nargs="+", default=[4, 256, 2048],
                    help="sizes for --latency, KiB")
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="with --latency: idle this long before each pull (as in serving)")
    ap.add_argument("--pairs", type=int, default=1, help="fresh process pairs (>1: summary)")
    ap.add_argument("--slow-gibs", type=float, default=2.0, help="count pairs below this")
    ap.add_argument("--cpus", type=int, nargs="+", help="pin both processes to these CPUs")
    ap.add_argument("--kick-us", type=float, default=TransferConfig.kick_interval_us,
                    help="TransferConfig.kick_interval_us of both agents (0: no kicker)")
    args = ap.parse_args()
    if args.runs is None:
        args.runs = 200 if args.latency else 5
    if args.cpus:
        os.sched_setaffinity(0, set(args.cpus))  # the peer process inherits it
    if args.pairs > 1:
        await bench_pairs(args.sizes_mib, args.runs, args.pairs, args.slow_gibs, args.kick_us)
        return
    agent, peer = await start_pair(args.kick_us)
    if args.latency:
        try:
            await bench_latency(agent, peer, args.latency_kib, args.runs, args.gap_ms / 1e3)
        finally:
            await peer.stop()
            await agent.close()
        return
    try:
        await bench_sizes(agent, peer, args.sizes_mib, args.runs)
        await bench_kv(agent, peer, args.runs)
    finally:
        await peer.stop()
        await agent.close()


if __name__ == "__main__":
    asyncio.run(main())
