"""Paged KV block allocator: allocation, growth, reference counts, exhaustion."""

import pytest

from workers.engine.block_manager import BlockManager, OutOfBlocks, block_hash


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert len(set(a) | set(b)) == 8 and bm.num_free == 0
    bm.free(a)
    assert bm.num_free == 3
    bm.free(b)
    assert bm.num_free == 8


def test_out_of_blocks_is_clear_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(OutOfBlocks, match="need 3 KV blocks, 2 of 2 free"):
        bm.allocate(3)
    assert bm.num_free == 2


def test_grow_allocates_only_missing_blocks_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    assert bm.grow(table, 5) and len(table) == 2
    assert bm.grow(table, 8) and len(table) == 2  # still fits in two blocks
    assert bm.grow(table, 9) and len(table) == 3
    assert not bm.grow(table, 17) and len(table) == 3  # would need 5 blocks: unchanged
    assert bm.num_free == 1


def test_shared_blocks_return_after_last_owner():
    bm = BlockManager(num_blocks=3, block_size=2)
    blocks = bm.allocate(2)
    bm.incref(blocks)
    assert [bm.ref_count(b) for b in blocks] == [2, 2]
    bm.free(blocks)
    assert bm.num_free == 1
    bm.free(blocks)
    assert bm.num_free == 3


def test_double_free_and_sharing_a_free_block_are_errors():
    bm = BlockManager(num_blocks=2, block_size=2)
    [b] = bm.allocate(1)
    bm.free([b])
    with pytest.raises(ValueError, match="freed twice"):
        bm.free([b])
    with pytest.raises(ValueError, match="is free"):
        bm.incref([b])


def test_block_hash_chains_parent_and_image_hashes():
    h1 = block_hash(None, [1, 2, 3, 4])
    assert h1 == block_hash(None, [1, 2, 3, 4])
    assert h1 != block_hash("p", [1, 2, 3, 4])
    # Same placeholder ids, different images: different blocks.
    assert block_hash(None, [9, 9], ["imgA"]) != block_hash(None, [9, 9], ["imgB"])
