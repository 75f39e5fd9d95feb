"""LRU cache of image embeddings keyed by content hash, bounded in bytes.

The encode worker (and any worker that encodes in-process) looks an item up by the sha256 of its
source bytes before running the vision tower: the same image sent twice is encoded once. Entries
are tensors plus the small metadata the handle needs (``num_tokens``, model extras). The cache is
used from one event loop; a lock makes it safe from threads as well.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CachedEmbedding:
    embeds: torch.Tensor  # [n, hidden]
    num_tokens: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size()


class EmbeddingCache:
    """Least-recently-used map content_hash -> CachedEmbedding with a total-bytes budget.

    An entry larger than the whole budget is not stored (it would evict everything for nothing).
    ``max_bytes == 0`` disables caching.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("embedding cache size must be >= 0 bytes")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedEmbedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedEmbedding | None:
        """The entry for ``key`` (now most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: CachedEmbedding) -> bool:
        """Store ``entry``, evicting least-recently-used ones; False if it cannot fit at all."""
        size = entry.nbytes
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return False
            while self._bytes + size > self.max_bytes and self._entries:
                self._pop(next(iter(self._entries)))
            self._entries[key] = entry
            self._bytes += size
            return True

    def _pop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
