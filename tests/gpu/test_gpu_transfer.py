"""UCX pulls of CUDA memory between two processes on one GPU (common.transfer, cuda_ipc).

Needs ucxx for the machine's CUDA (the device bundle's .whl/ucx; tests/perf/gpu_all.sh puts it
on the path); skips without it. Bytes must arrive bit-exact: a contiguous tensor (zero-copy on
both sides) and KV blocks scattered on both sides (gather on the owner and scatter here, on the
transfer stream), and a pull must not wait behind work queued on the default stream.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

pytest.importorskip("ucxx", reason="ucxx is not installed (carry .whl/ucx to the GPU machine)")

from common.transfer import TransferAgent, TransferConfig  # noqa: E402
from tests.integration.transfer_peer import PeerProc, make_regions  # noqa: E402

KV_BLOCK = [28, 2, 16, 4, 128]  # Qwen2.5-VL-7B: [layers, K/V, block_size, kv_heads, head_dim]


def kv_spec(block_ids: list[int], device: str) -> dict:
    return {"kind": "kv", "num_blocks": 256, "block_shape": KV_BLOCK, "dtype": "bfloat16",
            "block_ids": block_ids, "seed": 5, "device": device}


async def _run() -> dict:
    agent = TransferAgent(TransferConfig(op_timeout_s=20.0))
    await agent.start()
    peer = await PeerProc.start()
    try:
        flat = {"kind": "flat", "nbytes": 2_260_992, "seed": 9, "device": "cuda"}  # one image
        await peer.call(cmd="register", key="emb", spec=flat)
        dst = torch.zeros(flat["nbytes"], dtype=torch.uint8, device="cuda")
        await agent.pull(peer.address, "emb", [dst])
        flat_ok = torch.equal(dst.cpu(), make_regions({**flat, "device": "cpu"})[0])

        rng = random.Random(1)
        src_ids, dst_ids = rng.sample(range(256), 85), rng.sample(range(256), 85)
        await peer.call(cmd="register", key="kv", spec=kv_spec(src_ids, "cuda"))
        cache = torch.zeros(256, *KV_BLOCK, dtype=torch.bfloat16, device="cuda")
        # Keep the default stream busy: the pull (its scatter) must not wait for this work.
        big = torch.randn(8192, 8192, device="cuda")
        for _ in range(40):
            big = big @ big / 8192
        t0 = time.perf_counter()
        await agent.pull(peer.address, "kv", [cache[b] for b in dst_ids])
        pull_s = time.perf_counter() - t0
        busy_left = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
        want = make_regions(kv_spec(src_ids, "cpu"))
        got = cache.cpu()
        kv_ok = all(torch.equal(got[b].view(torch.uint8), w.view(torch.uint8))
                    for b, w in zip(dst_ids, want))
        untouched = sorted(set(range(256)) - set(dst_ids))
        clean = not got[untouched].view(torch.uint8).any()
        times = []
        for _ in range(20):  # warm: the small pull's fixed cost
            t0 = time.perf_counter()
            await agent.pull(peer.address, "emb", [dst])
            times.append(time.perf_counter() - t0)
        state = await peer.call(cmd="state")
        return {"flat_ok": flat_ok, "kv_ok": kv_ok, "clean": clean, "busy_left": busy_left,
                "pull_s": pull_s, "small_p50_ms": 1e3 * sorted(times)[len(times) // 2],
                "gathered": state["stats"]["gathered_bytes"],
                "scattered": agent.stats.scattered_bytes}
    finally:
        await peer.stop()
        await agent.close()


def test_cuda_pulls_are_bit_exact_and_do_not_wait_for_the_default_stream():
    r = asyncio.run(_run())
    print(r)
    assert r["flat_ok"] and r["kv_ok"] and r["clean"]
    assert r["gathered"] > 0 and r["scattered"] > 0  # scattered blocks went through staging
    # The matmuls queued before the pull were still running when it returned.
    assert r["busy_left"], r
