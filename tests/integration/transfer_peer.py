"""A second process for the transfer tests and benchmark: a real TransferAgent driven over stdio.

Run as ``python -m tests.integration.transfer_peer [--midway] [--ttl S] [--timeout S]
[--kick-us US]``. It prints
``{"address": ...}`` once started, then answers one JSON line per JSON command line on stdin:

  {"cmd": "register", "key", "spec", "ttl_s"?}  -> {"remote"}   spec: see ``make_regions``
  {"cmd": "pull", "addr", "key", "spec", "count"?} -> {"sha256": [...], "seconds": [...]}
  {"cmd": "state"}                               -> {"registered", "released", "stats"}
  {"cmd": "exit"}                                -> {} and the process exits

With ``--midway`` the agent sends only the first message of each pull it serves, prints
``{"midway": true}`` and stalls, so a test can SIGKILL it in the middle of a transfer.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 120.0  # importing torch + ucxx takes seconds on a busy shared CPU
if __package__ in (None, ""):  # started as a script: make `common` importable
    sys.path.insert(0, str(REPO_ROOT))

from common.transfer import TransferAgent, TransferConfig  # noqa: E402


def make_tensor(seed: int, nbytes: int) -> torch.Tensor:
    """Deterministic random bytes, reproducible in any process."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def make_regions(spec: dict[str, Any], fill: bool = True) -> list[torch.Tensor]:
    """The tensors a spec names, views of one allocation (so adjacent ones form runs).

    {"kind": "flat", "nbytes", "seed"}: one tensor.
    {"kind": "kv", "num_blocks", "block_shape", "dtype", "block_ids", "seed"}: KV blocks of a
    block-major cache; block b of the whole cache holds bytes derived from ``seed``.
    {"kind": "pieces", "nbytes": [...], "gap", "seed"}: separate tensors with gaps between.
    Any spec may add ``"device"`` (e.g. "cuda"): the same bytes, in that device's memory.
    """
    if spec["kind"] == "flat":
        out = [make_tensor(spec["seed"], spec["nbytes"]) if fill
               else torch.empty(spec["nbytes"], dtype=torch.uint8)]
    elif spec["kind"] == "kv":
        out = _kv_blocks(spec, fill)
    else:
        out = _pieces(spec, fill)
    device = spec.get("device", "cpu")
    if device == "cpu":
        return out
    if spec["kind"] == "flat":
        return [out[0].to(device)]
    # Keep the views of one allocation (runs): move the whole base, then take the same views.
    base = out[0]._base if out[0]._base is not None else out[0]
    moved = base.to(device)
    return [moved.as_strided(t.shape, t.stride(), t.storage_offset()) for t in out]


def _kv_blocks(spec: dict[str, Any], fill: bool) -> list[torch.Tensor]:
    dtype = getattr(torch, spec["dtype"])
    shape = (spec["num_blocks"], *spec["block_shape"])
    cache = torch.zeros(shape, dtype=dtype)
    if fill:
        raw = make_tensor(spec["seed"], cache.numel() * cache.element_size())
        cache.view(-1).view(torch.uint8).copy_(raw)
    return [cache[b] for b in spec["block_ids"]]


def _pieces(spec: dict[str, Any], fill: bool) -> list[torch.Tensor]:
    sizes, gap = spec["nbytes"], spec["gap"]
    whole = make_tensor(spec["seed"], sum(sizes) + gap * len(sizes)) if fill else \
        torch.zeros(sum(sizes) + gap * len(sizes), dtype=torch.uint8)
    out, at = [], 0
    for n in sizes:
        out.append(whole[at:at + n])
        at += n + gap
    return out


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(memoryview(t.contiguous().view(-1).view(torch.uint8).cpu().numpy()))
    return h.hexdigest()


class PeerProc:
    """A transfer_peer process: JSON commands over stdin/stdout; stopped by its PID."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.address = ""

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> PeerProc:
        """Start a peer (``env`` is added to this process's environment) and read its address."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.integration.transfer_peer", *args, cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", **(env or {})})
        peer = cls(proc)
        peer.address = (await peer.read(STARTUP_S))["address"]
        return peer

    async def read(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:  # UCX may log to stdout too: answers are the lines holding a JSON object
            line = await asyncio.wait_for(self.proc.stdout.readline(),
                                          max(0.0, deadline - time.monotonic()))
            if not line:
                raise RuntimeError(f"peer {self.proc.pid} exited (rc={self.proc.returncode})")
            if line.startswith(b"{"):
                return json.loads(line)

    async def call(self, timeout: float = 30.0, **msg: Any) -> dict[str, Any]:
        await self.send(**msg)
        reply = await self.read(timeout)
        assert "error" not in reply, reply["error"]
        return reply

    async def send(self, **msg: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        await self.proc.stdin.drain()

    def kill(self) -> None:
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                await self.call(timeout=10.0, cmd="exit")
                await asyncio.wait_for(self.proc.wait(), 10.0)
            except Exception:
                self.kill()
        await self.proc.wait()


class MidwayAgent(TransferAgent):
    """Serves the first message of a pull, then stalls (for killing a peer mid-transfer)."""

    def _start_sends(self, peer: str, tid: int, rmap: Any, plan: list[tuple[int, int]]) -> Any:
        return super()._start_sends(peer, tid, rmap, plan[:1])

    async def _finish_sends(self, peer: str, entry: Any, sends: Any) -> None:
        await super()._finish_sends(peer, entry, sends)  # the first message has been sent
        _emit({"midway": True})
        await asyncio.sleep(3600)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Peer:
    def __init__(self, agent: TransferAgent) -> None:
        self.agent = agent
        self.keep: dict[str, list[torch.Tensor]] = {}
        self.released: list[str] = []

    async def register(self, msg: dict[str, Any]) -> dict[str, Any]:
        tensors = make_regions(msg["spec"])
        self.keep[msg["key"]] = tensors
        remote = self.agent.register(msg["key"], tensors, ttl_s=msg.get("ttl_s"),
                                     on_release=self.released.append)
        return {"remote": remote}

    async def pull(self, msg: dict[str, Any]) -> dict[str, Any]:
        dst = make_regions(msg["spec"], fill=False)
        hashes, seconds = [], []
        for _ in range(int(msg.get("count", 1))):
            t0 = time.perf_counter()
            await self.agent.pull(msg["addr"], msg["key"], dst)
            seconds.append(time.perf_counter() - t0)
            hashes.append(digest(dst) if msg.get("hash", True) else "")
        return {"sha256": hashes, "seconds": seconds}

    async def state(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"registered": self.agent.num_registered, "released": self.released,
                "stats": dataclasses.asdict(self.agent.stats)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--midway", action="store_true")
    ap.add_argument("--ttl", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--kick-us", type=float, default=TransferConfig.kick_interval_us)
    args = ap.parse_args()
    cls = MidwayAgent if args.midway else TransferAgent
    agent = cls(TransferConfig(handle_ttl_s=args.ttl, op_timeout_s=args.timeout,
                               kick_interval_us=args.kick_us))
    await agent.start()
    peer = Peer(agent)
    _emit({"address": agent.address})
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        msg = json.loads(line) if line.strip() else {"cmd": "exit"}
        if msg["cmd"] == "exit":
            break
        try:
            _emit(await getattr(peer, msg["cmd"])(msg))
        except Exception as exc:
            _emit({"error": f"{type(exc).__name__}: {exc}"})
    await agent.close()
    _emit({})


if __name__ == "__main__":
    asyncio.run(main())
