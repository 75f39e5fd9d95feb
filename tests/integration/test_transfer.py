"""The UCX data plane between real processes (common.transfer): bytes, op counts, lifetimes, faults.

Each peer is a separate Python process running a real TransferAgent (tests/integration/
transfer_peer.py); worker addresses travel over its stdout, as they would through etcd.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from common.transfer import (  # noqa: E402
    TransferAgent, TransferConfig, TransferError, TransferTimeout, UnknownKey)
from tests.integration.transfer_peer import PeerProc, digest, make_regions  # noqa: E402

# One event loop for the module, so the peer processes (slow to start on a busy CPU) are shared.
pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]

KV_BLOCK = [28, 2, 16, 2, 16]  # [layers, 2, block_size, kv_heads, head_dim]


@pytest_asyncio.fixture(loop_scope="module")
async def agent() -> AsyncIterator[TransferAgent]:
    a = TransferAgent(TransferConfig(handle_ttl_s=60.0, op_timeout_s=10.0))
    await a.start()
    yield a
    await a.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def peers() -> AsyncIterator[tuple[PeerProc, PeerProc]]:
    started = await asyncio.gather(PeerProc.start(), PeerProc.start(), return_exceptions=True)
    try:
        for p in started:
            if isinstance(p, BaseException):
                raise p
        yield started[0], started[1]
    finally:
        await asyncio.gather(*(p.stop() for p in started if isinstance(p, PeerProc)))


@pytest.fixture
def peer(peers: tuple[PeerProc, PeerProc]) -> PeerProc:
    return peers[0]


def kv_spec(block_ids: list[int], num_blocks: int = 200, seed: int = 7,
            dtype: str = "bfloat16") -> dict[str, Any]:
    return {"kind": "kv", "num_blocks": num_blocks, "block_shape": KV_BLOCK, "dtype": dtype,
            "block_ids": block_ids, "seed": seed}


async def test_64mib_tensor_bit_exact(agent: TransferAgent, peer: PeerProc) -> None:
    spec = {"kind": "flat", "nbytes": 64 << 20, "seed": 1}
    await peer.call(cmd="register", key="big", spec=spec)
    dst = torch.zeros(64 << 20, dtype=torch.uint8)
    await agent.pull(peer.address, "big", [dst])
    assert torch.equal(dst, make_regions(spec)[0])
    assert agent.stats.pull_data_ops == 1 and agent.stats.scattered_bytes == 0  # zero-copy
    assert await agent.release(peer.address, "big")


async def _pull_kv(agent: TransferAgent, peer: PeerProc, key: str, src_ids: list[int],
                   dst_ids: list[int]) -> tuple[int, int]:
    """Pull blocks src_ids into dst_ids of a fresh local cache; check bytes; return op counts."""
    await peer.call(cmd="register", key=key, spec=kv_spec(src_ids))
    cache = torch.zeros(200, *KV_BLOCK, dtype=torch.bfloat16)
    before = (agent.stats.pull_data_ops, agent.stats.pull_control_ops)
    await agent.pull(peer.address, key, [cache[b] for b in dst_ids])
    expected = make_regions(kv_spec(src_ids))
    for block, want in zip(dst_ids, expected):
        assert torch.equal(cache[block].view(torch.uint8), want.view(torch.uint8)), block
    untouched = sorted(set(range(200)) - set(dst_ids))
    assert not cache[untouched].view(torch.uint8).any()
    return agent.stats.pull_data_ops - before[0], agent.stats.pull_control_ops - before[1]


async def test_kv_blocks_into_other_block_ids(agent: TransferAgent, peer: PeerProc) -> None:
    rng = random.Random(0)
    max_ops = agent.config.max_ops
    counts = {}
    for n in (16, 128):  # 28 layers x n blocks; the op count must not depend on n
        src = rng.sample(range(200), n)  # scattered on the owner too: it gathers
        dst = rng.sample(range(200), n)
        counts[n] = await _pull_kv(agent, peer, f"kv{n}", src, dst)
    assert counts[16] == counts[128] == (1, 1), counts  # 1 data receive + the request
    # Contiguous on both sides: zero-copy, one message; a few runs: one message per run.
    assert await _pull_kv(agent, peer, "run", list(range(40, 168)), list(range(0, 128))) == (1, 1)
    three_runs = [*range(0, 40), *range(100, 140), *range(150, 198)]
    ops, _ = await _pull_kv(agent, peer, "runs3", list(range(0, 128)), three_runs)
    assert ops == 3 <= max_ops
    state = await peer.call(cmd="state")
    assert state["stats"]["gathered_bytes"] > 0 and agent.stats.scattered_bytes > 0
    for key in ("kv16", "kv128", "run", "runs3"):
        assert await agent.release(peer.address, key)


async def test_release_frees_on_owner(agent: TransferAgent, peer: PeerProc) -> None:
    registered = (await peer.call(cmd="state"))["registered"]
    await peer.call(cmd="register", key="r1", spec={"kind": "flat", "nbytes": 4096, "seed": 2})
    await peer.call(cmd="register", key="r2", spec={"kind": "flat", "nbytes": 4096, "seed": 3})
    assert (await peer.call(cmd="state"))["registered"] == registered + 2
    dst = torch.empty(4096, dtype=torch.uint8)
    await agent.pull(peer.address, "r1", [dst])
    assert await agent.release(peer.address, "r1") is True
    assert await agent.release(peer.address, "r2") is True
    assert await agent.release(peer.address, "r2") is False  # idempotent
    state = await peer.call(cmd="state")
    assert state["registered"] == registered and state["released"][-2:] == ["r1", "r2"]
    with pytest.raises(UnknownKey):
        await agent.pull(peer.address, "r1", [dst])


async def test_local_unregister_and_ttl(agent: TransferAgent) -> None:
    released: list[str] = []
    agent.register("a", [torch.ones(10)], on_release=released.append)
    agent.register("b", [torch.ones(10)], ttl_s=0.3, on_release=released.append)
    assert agent.num_registered == 2
    assert agent.unregister("a") and not agent.unregister("a")
    await asyncio.sleep(1.0)
    assert agent.num_registered == 0 and released == ["a", "b"]
    assert agent.stats.expired == 1


async def test_ttl_expiry_then_unknown_key_is_fast(agent: TransferAgent, peer: PeerProc) -> None:
    spec = {"kind": "flat", "nbytes": 1024, "seed": 4}
    await peer.call(cmd="register", key="t", spec=spec, ttl_s=0.5)
    before = (await peer.call(cmd="state"))["stats"]["expired"]
    await asyncio.sleep(1.5)
    state = await peer.call(cmd="state")
    assert "t" in state["released"] and state["stats"]["expired"] == before + 1
    t0 = time.monotonic()
    with pytest.raises(UnknownKey, match="'t'"):
        await agent.pull(peer.address, "t", [torch.empty(1024, dtype=torch.uint8)])
    with pytest.raises(UnknownKey):
        await agent.pull(peer.address, "never", [torch.empty(8, dtype=torch.uint8)])
    assert time.monotonic() - t0 < 1.0


async def test_size_mismatch_is_value_error(agent: TransferAgent, peer: PeerProc) -> None:
    await peer.call(cmd="register", key="s", spec={"kind": "flat", "nbytes": 1000, "seed": 5})
    posted = agent.stats.pull_data_ops
    dst = torch.full((999,), 0xA5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="dst\\[0\\] has 999 bytes"):
        await agent.pull(peer.address, "s", [dst])
    halves = [torch.full((500,), 0xA5, dtype=torch.uint8) for _ in range(2)]
    with pytest.raises(ValueError, match="holds 1 tensors, dst has 2"):
        await agent.pull(peer.address, "s", halves)
    # The receives were posted before the owner answered; its error reply retired them with
    # zero-byte messages: nothing landed in dst.
    assert agent.stats.pull_data_ops == posted + 3
    assert all(bool((t == 0xA5).all()) for t in (dst, *halves))
    with pytest.raises(ValueError, match="contiguous"):  # refused before anything is posted
        await agent.pull(peer.address, "s", [torch.empty(20, 50, dtype=torch.uint8).t()])
    assert agent.stats.pull_data_ops == posted + 3
    assert agent.stats.pulls == 0 and agent.stats.timeouts == 0


async def test_error_replies_leave_dst_untouched_and_the_agent_working(
        agent: TransferAgent, peer: PeerProc) -> None:
    """Pre-posted receives (direct and staged) retired by an error reply write nothing, and
    the same data worker serves the next pulls (no timeout, no retired worker)."""
    spec = {"kind": "pieces", "nbytes": [4096] * 12, "gap": 64, "seed": 12}  # > max_ops runs
    await peer.call(cmd="register", key="e", spec=spec)
    data_worker = agent._data
    for key, dst in (("missing", make_regions(spec, fill=False)),  # unknown key, 12 regions
                     ("missing", [torch.empty(2 << 20, dtype=torch.uint8)]),  # one direct
                     ("e", [torch.empty(4096 * 12 + 1, dtype=torch.uint8)])):  # size mismatch
        for t in dst:
            t.fill_(0x5A)
        with pytest.raises((UnknownKey, ValueError)):
            await agent.pull(peer.address, key, dst, timeout=5)
        assert all(bool((t == 0x5A).all()) for t in dst)
    assert agent.stats.timeouts == 0 and agent._data is data_worker
    for _ in range(3):
        out = make_regions(spec, fill=False)
        await agent.pull(peer.address, "e", out)
        assert digest(out) == digest(make_regions(spec))
    assert agent._data is data_worker
    assert await agent.release(peer.address, "e")


async def test_fifo_size_mismatch_is_a_clear_error(agent: TransferAgent) -> None:
    """Processes whose shared-memory FIFO sizes differ would hang in UCX: the owner refuses."""
    odd = await PeerProc.start(env={"UCX_MM_FIFO_SIZE": "256"})
    try:
        await odd.call(cmd="register", key="f", spec={"kind": "flat", "nbytes": 4096, "seed": 2})
        dst = torch.full((4096,), 7, dtype=torch.uint8)
        with pytest.raises(TransferError, match="UCX_MM_FIFO_SIZE differs: this owner uses 256"):
            await agent.pull(odd.address, "f", [dst], timeout=5)
        assert agent.stats.timeouts == 0 and bool((dst == 7).all())
    finally:
        await odd.stop()


async def test_peer_killed_mid_transfer(agent: TransferAgent, peer: PeerProc) -> None:
    dying = await PeerProc.start("--midway")
    try:
        spec = {"kind": "pieces", "nbytes": [1 << 20, 2 << 20, 1 << 20], "gap": 64, "seed": 6}
        await dying.call(cmd="register", key="m", spec=spec)
        dst = make_regions(spec, fill=False)
        pull = asyncio.ensure_future(agent.pull(dying.address, "m", dst, timeout=3.0))
        assert (await dying.read(timeout=10.0)) == {"midway": True}  # first message sent
        dying.kill()
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):
            await pull
        assert time.monotonic() - t0 < 3.5
        assert torch.equal(dst[0], make_regions(spec)[0])  # the first message did land
    finally:
        dying.kill()
        await dying.proc.wait()
    # The agent still works, with another peer.
    good = {"kind": "flat", "nbytes": 8 << 20, "seed": 8}
    await peer.call(cmd="register", key="after", spec=good)
    out = torch.empty(8 << 20, dtype=torch.uint8)
    await agent.pull(peer.address, "after", [out])
    assert torch.equal(out, make_regions(good)[0])


async def test_peer_killed_during_one_large_message(agent: TransferAgent, peer: PeerProc) -> None:
    """Killed while the receiver reads a 256 MiB message (with CMA, UCX would abort us here)."""
    dying = await PeerProc.start()
    try:
        spec = {"kind": "flat", "nbytes": 256 << 20, "seed": 11}
        await dying.call(cmd="register", key="huge", spec=spec, timeout=60.0)
        dst = [torch.zeros(256 << 20, dtype=torch.uint8)]
        pull = asyncio.ensure_future(agent.pull(dying.address, "huge", dst, timeout=3.0))
        while not dst[0][:8192].any() and not pull.done():
            await asyncio.sleep(0.0005)  # the first bytes landed: the rest is on the way
        dying.kill()
        with pytest.raises(TransferTimeout):
            await pull
        assert agent.stats.timeouts == 1  # and the data worker was replaced (see _retire)
    finally:
        dying.kill()
        await dying.proc.wait()
    await peer.call(cmd="register", key="after2", spec={"kind": "flat", "nbytes": 4096, "seed": 1})
    await agent.pull(peer.address, "after2", [torch.empty(4096, dtype=torch.uint8)])


async def test_concurrent_pulls_from_two_receivers(agent: TransferAgent,
                                                   peers: tuple[PeerProc, PeerProc]) -> None:
    flat = {"kind": "flat", "nbytes": 16 << 20, "seed": 9}
    kv = kv_spec(list(range(0, 128, 2)), seed=10, dtype="float32")
    agent.register("flat", make_regions(flat))
    agent.register("kv", make_regions(kv))
    dst_kv = kv_spec(list(range(64)), seed=10, dtype="float32")

    async def both(p: PeerProc) -> list[dict[str, Any]]:  # one peer's commands in order
        return [await p.call(cmd="pull", addr=agent.address, key=key, spec=spec, count=4,
                             timeout=60.0) for key, spec in (("flat", flat), ("kv", dst_kv))]

    replies = await asyncio.gather(*(both(p) for p in peers))
    want = [digest(make_regions(flat)), digest(make_regions(kv))]
    for per_peer in replies:
        for reply, expected in zip(per_peer, want):
            assert reply["sha256"] == [expected] * 4
    assert agent.stats.served_pulls == 16


async def test_pull_after_owner_restart(agent: TransferAgent) -> None:
    """An owner dies and comes back (a new process, a new address): pulls from the dead one
    time out, pulls from the new one work, and so does the agent's next data worker."""
    spec = {"kind": "flat", "nbytes": 64 << 10, "seed": 13}
    first = await PeerProc.start()
    try:
        await first.call(cmd="register", key="r", spec=spec)
        dst = torch.empty(64 << 10, dtype=torch.uint8)
        await agent.pull(first.address, "r", [dst])
        assert torch.equal(dst, make_regions(spec)[0])
        first.kill()
        await first.proc.wait()
        dst.fill_(0)
        with pytest.raises(TransferTimeout):
            await agent.pull(first.address, "r", [dst], timeout=1.0)
        assert agent.stats.timeouts == 1
    finally:
        first.kill()
        await first.proc.wait()
    second = await PeerProc.start()
    try:
        await second.call(cmd="register", key="r", spec=spec)
        for _ in range(3):
            out = torch.empty(64 << 10, dtype=torch.uint8)
            await agent.pull(second.address, "r", [out])
            assert torch.equal(out, make_regions(spec)[0])
        assert await agent.release(second.address, "r")
        assert (await second.call(cmd="state"))["stats"]["served_pulls"] == 3
    finally:
        await second.stop()
