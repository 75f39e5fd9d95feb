"""Paged KV block allocator with reference counts.

A block holds ``block_size`` consecutive tokens of one sequence's KV (all layers, K and V: the
cache is block-major). Blocks are reference counted so that, later, several sequences can share a
cached prefix block (prefix caching). ``block_hash`` is the key such a cache will use: it chains
the parent block's hash with the block's token ids and the content hashes of the images whose
placeholders fall in the block, so equal placeholder ids of different images never collide.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Sequence


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks right now; retry after other requests finish."""


def block_hash(parent: str | None, token_ids: Sequence[int], mm_hashes: Sequence[str] = ()) -> str:
    """Content hash of one full block, chained to its prefix (for prefix caching)."""
    h = hashlib.sha256()
    h.update((parent or "").encode())
    h.update(",".join(map(str, token_ids)).encode())
    h.update("|".join(mm_hashes).encode())
    return h.hexdigest()


class BlockManager:
    """Hands out block ids from a fixed pool; a block returns to the pool when its count hits 0."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` fresh blocks (ref count 1 each); raise OutOfBlocks if fewer are free."""
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} of {self.num_blocks} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def grow(self, block_ids: list[int], num_tokens: int) -> bool:
        """Extend ``block_ids`` in place to hold ``num_tokens`` tokens; False (unchanged) if short."""
        need = self.blocks_for(num_tokens) - len(block_ids)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        block_ids.extend(self.allocate(need))
        return True

    def incref(self, block_ids: Iterable[int]) -> None:
        """Share already-allocated blocks with one more owner."""
        for b in block_ids:
            if self._refs[b] < 1:
                raise ValueError(f"block {b} is free: cannot share it")
            self._refs[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks nobody holds go back to the pool."""
        for b in block_ids:
            if self._refs[b] < 1:
                raise ValueError(f"block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
