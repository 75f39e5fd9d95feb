"""Pure planning for UCX pulls: which byte ranges move as which messages (no UCX here).

A pull moves a list of regions (tensors) from an owner into a receiver's list of regions of the
same sizes. Both sides see the regions as one logical byte stream (their concatenation). Each side
merges regions that are adjacent in memory into *runs*; a message is a byte range of the logical
stream. A side whose part of a message lies inside one run moves it zero-copy; otherwise it goes
through one staging buffer (gather on the owner, scatter on the receiver).

The plan keeps the number of messages at most ``max_ops`` whatever the number of regions, so the
number of UCX operations per pull does not grow with layers x blocks.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Run:
    """Regions adjacent in memory: logical byte range [start, start + nbytes) at address ptr."""

    start: int
    ptr: int
    nbytes: int


@dataclass(frozen=True)
class RegionMap:
    """One side's regions: their byte views, logical offsets and merged runs."""

    views: tuple[torch.Tensor, ...]  # flat uint8 views of the caller's tensors (no copies)
    offsets: tuple[int, ...]  # logical start of each region
    sizes: tuple[int, ...]
    runs: tuple[Run, ...]
    device: torch.device

    @property
    def total(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.sizes else 0

    def bounds(self, limit: int) -> list[int] | None:
        """Logical offsets where a new run starts (0 excluded); None when more than ``limit``."""
        if len(self.runs) - 1 > limit:
            return None
        return [r.start for r in self.runs[1:]]


def byte_view(t: torch.Tensor, what: str) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's memory (shares storage, never copies)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (call .contiguous() on it first)")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty; only non-empty tensors can be transferred")
    return t.reshape(-1).view(torch.uint8)


def region_map(tensors: Sequence[torch.Tensor], what: str) -> RegionMap:
    """Validate ``tensors`` (contiguous, non-empty, one device) and merge them into runs."""
    if len(tensors) == 0:
        raise ValueError(f"{what} is empty: give at least one tensor")
    views = tuple(byte_view(t, f"{what}[{i}]") for i, t in enumerate(tensors))
    devices = {v.device for v in views}
    if len(devices) != 1:
        raise ValueError(f"{what} mixes devices {sorted(map(str, devices))}; use one device")
    sizes = tuple(v.numel() for v in views)
    offsets = tuple(_prefix_sums(sizes))
    return RegionMap(views, offsets, sizes, _merge_runs(views, offsets), views[0].device)


def _prefix_sums(sizes: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


def _merge_runs(views: Sequence[torch.Tensor], offsets: Sequence[int]) -> tuple[Run, ...]:
    runs: list[Run] = []
    for v, off in zip(views, offsets):
        ptr, n = v.data_ptr(), v.numel()
        if runs and runs[-1].ptr + runs[-1].nbytes == ptr:
            last = runs[-1]
            runs[-1] = Run(last.start, last.ptr, last.nbytes + n)
        else:
            runs.append(Run(off, ptr, n))
    return tuple(runs)


def make_plan(total: int, owner_bounds: list[int] | None, recv_bounds: list[int] | None,
              max_ops: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of the messages, at most ``max_ops`` of them.

    Both sides direct when their run boundaries together allow it; else the receiver's runs
    (its side stays zero-copy, the owner gathers); else the owner's; else one staged message.
    """
    if owner_bounds is not None and recv_bounds is not None:
        cuts = sorted(set(owner_bounds) | set(recv_bounds))
        if len(cuts) + 1 <= max_ops:
            return _segments(total, cuts)
    for cuts in (recv_bounds, owner_bounds):
        if cuts is not None and len(cuts) + 1 <= max_ops:
            return _segments(total, cuts)
    return [(0, total)]


def _segments(total: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    edges = [0, *cuts, total]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def direct_run(rmap: RegionMap, start: int, end: int) -> Run | None:
    """The run holding all of [start, end), or None when the range spans several runs."""
    starts = [r.start for r in rmap.runs]
    i = bisect.bisect_right(starts, start) - 1
    run = rmap.runs[i]
    return run if end <= run.start + run.nbytes else None


def pieces(rmap: RegionMap, start: int, end: int) -> list[tuple[torch.Tensor, int]]:
    """(region byte slice, offset in the message) for each region overlapping [start, end)."""
    out = []
    i = bisect.bisect_right(rmap.offsets, start) - 1
    while i < len(rmap.sizes) and rmap.offsets[i] < end:
        lo = max(start, rmap.offsets[i])
        hi = min(end, rmap.offsets[i] + rmap.sizes[i])
        base = rmap.offsets[i]
        out.append((rmap.views[i][lo - base:hi - base], lo - start))
        i += 1
    return out


def gather(rmap: RegionMap, start: int, end: int, staging: torch.Tensor) -> None:
    """Copy [start, end) of the logical stream into ``staging`` (owner side)."""
    for piece, at in pieces(rmap, start, end):
        staging[at:at + piece.numel()].copy_(piece)
    if staging.is_cuda:  # UCX reads the buffer outside torch's stream order
        torch.cuda.current_stream(staging.device).synchronize()


class StagingPool:
    """Reusable staging buffers, used from one thread (the agent's event loop).

    A fresh large CPU allocation is new mmap'd memory that page-faults on first touch: that
    made a 7 MiB gather ~10x slower than a copy into a buffer already used once.
    """

    def __init__(self, max_bytes: int) -> None:
        self._free: list[torch.Tensor] = []
        self._max_bytes = max_bytes

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A buffer of at least ``nbytes`` on ``device`` (give it back with ``give``)."""
        fits = [b for b in self._free if b.device == device and b.numel() >= nbytes]
        if fits:
            best = min(fits, key=lambda b: b.numel())
            self._free = [b for b in self._free if b is not best]
            return best
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def give(self, buf: torch.Tensor) -> None:
        held = sum(b.numel() for b in self._free)
        if held + buf.numel() <= self._max_bytes:
            self._free.append(buf)


def scatter(rmap: RegionMap, start: int, staging: torch.Tensor) -> None:
    """Copy a received staging buffer into the regions it covers (receiver side)."""
    for piece, at in pieces(rmap, start, start + staging.numel()):
        piece.copy_(staging[at:at + piece.numel()])


def sizes_rle(sizes: Sequence[int]) -> list[list[int]]:
    """Run-length encode region sizes ([[nbytes, count], ...]): KV blocks are all one size."""
    out: list[list[int]] = []
    for n in sizes:
        if out and out[-1][0] == n:
            out[-1][1] += 1
        else:
            out.append([n, 1])
    return out


def sizes_from_rle(rle: Sequence[Sequence[int]]) -> list[int]:
    return [n for n, count in rle for _ in range(count)]


def encode(body: dict[str, Any]) -> bytearray:
    """A control message: 4-byte little-endian length, then compact JSON."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    return bytearray(len(payload).to_bytes(4, "little") + payload)


def decode(buf: bytearray) -> dict[str, Any]:
    n = int.from_bytes(buf[:4], "little")
    if not 0 < n <= len(buf) - 4:
        raise ValueError(f"bad control message length {n}")
    return json.loads(bytes(buf[4:4 + n]))


def size_problem(owner: Sequence[int], receiver: Sequence[int]) -> str:
    """Why a receiver's region sizes cannot take the owner's ('' when they can)."""
    if len(owner) != len(receiver):
        return f"owner holds {len(owner)} tensors, dst has {len(receiver)}"
    for i, (a, b) in enumerate(zip(owner, receiver)):
        if a != b:
            return f"dst[{i}] has {b} bytes, the owner's tensor has {a}"
    return ""
