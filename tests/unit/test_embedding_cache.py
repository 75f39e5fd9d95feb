"""workers.embedding_cache: LRU order, byte budget, oversize entries, replacement."""

from __future__ import annotations

import pytest
import torch

from workers.embedding_cache import CachedEmbedding, EmbeddingCache


def _entry(rows: int, hidden: int = 16) -> CachedEmbedding:
    # float32: rows * hidden * 4 bytes
    return CachedEmbedding(embeds=torch.full((rows, hidden), float(rows)), num_tokens=rows,
                           extras={"grid_thw": [1, rows, 1]})


def test_get_put_and_hit_counts() -> None:
    cache = EmbeddingCache(max_bytes=10_000)
    assert cache.get("a") is None
    assert cache.put("a", _entry(4))
    got = cache.get("a")
    assert got is not None and got.num_tokens == 4 and got.extras == {"grid_thw": [1, 4, 1]}
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.nbytes == 4 * 16 * 4


def test_evicts_least_recently_used_by_bytes() -> None:
    cache = EmbeddingCache(max_bytes=3 * 256)  # room for three 4-row entries (256 B each)
    for key in "abc":
        cache.put(key, _entry(4))
    cache.get("a")  # a is now most recent; b is the oldest
    cache.put("d", _entry(4))
    assert "b" not in cache and all(k in cache for k in "acd")
    cache.put("e", _entry(8))  # 512 B: evicts c and a (oldest first)
    assert "c" not in cache and "a" not in cache and "d" in cache and "e" in cache
    assert cache.nbytes == 256 + 512 <= cache.max_bytes


def test_oversize_entry_not_stored_and_keeps_others() -> None:
    cache = EmbeddingCache(max_bytes=300)
    cache.put("a", _entry(4))
    assert not cache.put("huge", _entry(100))
    assert "huge" not in cache and "a" in cache and len(cache) == 1


def test_replace_same_key_accounts_bytes() -> None:
    cache = EmbeddingCache(max_bytes=10_000)
    cache.put("a", _entry(4))
    cache.put("a", _entry(8))
    assert len(cache) == 1 and cache.nbytes == 8 * 16 * 4
    assert cache.get("a").num_tokens == 8  # type: ignore[union-attr]


def test_disabled_and_invalid() -> None:
    cache = EmbeddingCache(max_bytes=0)
    assert not cache.put("a", _entry(1)) and cache.get("a") is None
    with pytest.raises(ValueError):
        EmbeddingCache(max_bytes=-1)
    cache = EmbeddingCache(max_bytes=1000)
    cache.put("x", _entry(2))
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
