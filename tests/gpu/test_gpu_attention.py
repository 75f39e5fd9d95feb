"""The Triton paged-attention backend against the reference backend (float32, upcast inputs).

Fresh random inputs every run; shuffled (non-contiguous) block tables; GQA; several head dims,
block sizes and sequence lengths; chunked prefill with prior context, mixed decode + prefill
steps, and pure decode steps with long contexts (the split-KV path).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.gpu.conftest import rel_err
from workers.engine.attention import AttentionMetadata, get_attention_backend

LAYERS, LAYER = 3, 1
BF16_TOL = 1e-2


def random_tables(lengths: list[int], block: int) -> tuple[list[list[int]], int]:
    need = [math.ceil(n / block) for n in lengths]
    num_blocks = sum(need) + 7
    perm = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for n in need:
        tables.append(perm[used:used + n])
        used += n
    return tables, num_blocks


def random_schedule(lengths: list[int], gen: torch.Generator, prefill_steps: int,
                    decode_tail: int) -> list[list[int]]:
    """Chunk sizes per step per sequence: a few random prefill chunks (mixing one-token chunks
    with long ones), then ``decode_tail`` steps of one token for every sequence."""
    left = [n - decode_tail for n in lengths]
    steps = []
    for i in range(prefill_steps):
        last = i == prefill_steps - 1
        step = [r if last else int(torch.randint(0, r + 1, (1,), generator=gen)) for r in left]
        left = [r - s for r, s in zip(left, step)]
        steps.append(step)
    steps.extend([[1] * len(lengths) for _ in range(decode_tail)])
    return [s for s in steps if any(s)]


class Pair:
    """The same inputs through the Triton backend (bf16 cache) and the reference (fp32 cache)."""

    def __init__(self, lengths, hq, hkv, d, block, dtype=torch.bfloat16):
        self.hq, self.hkv, self.d, self.block, self.dtype = hq, hkv, d, block, dtype
        self.tables, nb = random_tables(lengths, block)
        self.cache = torch.randn(nb, LAYERS, 2, block, hkv, d, device="cuda").to(dtype)  # not zeros
        self.ref_cache = self.cache.float().clone()
        self.fast, self.ref = get_attention_backend("triton"), get_attention_backend("reference")
        self.done = [0] * len(lengths)

    def step(self, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [i for i, n in enumerate(sizes) if n > 0]
        qlens = [sizes[i] for i in seqs]
        seq_lens = [self.done[i] + sizes[i] for i in seqs]
        meta = AttentionMetadata.build(qlens, seq_lens, [self.tables[i] for i in seqs], self.block, "cuda")
        t = sum(qlens)
        q = torch.randn(t, self.hq, self.d, device="cuda").to(self.dtype)
        k = torch.randn(t, self.hkv, self.d, device="cuda").to(self.dtype)
        v = torch.randn(t, self.hkv, self.d, device="cuda").to(self.dtype)
        scale = self.d ** -0.5
        out = self.fast.forward(q, k, v, self.cache, LAYER, meta, scale)
        ref = self.ref.forward(q.float(), k.float(), v.float(), self.ref_cache, LAYER, meta, scale)
        for i in seqs:
            self.done[i] += sizes[i]
        return out, ref


CASES = [  # (hq, hkv, head_dim, block_size, lengths)
    (28, 4, 128, 16, [1, 17, 64, 300, 1000]),  # Qwen2.5-VL-7B heads
    (16, 2, 128, 16, [2, 33, 129, 700]),  # Qwen2.5-VL-3B heads
    (8, 8, 64, 32, [5, 100, 257]),  # no GQA, another block size
    (12, 2, 80, 8, [3, 40, 333]),  # head_dim not a power of 2
    (4, 2, 16, 16, [7, 23, 13]),  # the tiny test model
]


@pytest.mark.parametrize("hq,hkv,d,block,lengths", CASES)
def test_chunked_prefill_then_decode_matches_reference(hq, hkv, d, block, lengths):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    pair = Pair(lengths, hq, hkv, d, block)
    schedule = random_schedule(lengths, gen, prefill_steps=3, decode_tail=1)
    for sizes in schedule:
        out, ref = pair.step(sizes)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < BF16_TOL, f"step {sizes}: rel err {rel_err(out, ref):.3g}"
    assert pair.done == lengths
    # Every written K/V row equals the reference's (same rows, written in the cache dtype).
    assert rel_err(pair.cache.float(), pair.ref_cache) < 1e-2


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_decode_long_contexts(batch):
    """Pure decode steps (the split-KV kernel) over contexts up to 3000 tokens."""
    lengths = torch.randint(1, 3000, (batch,)).tolist()
    pair = Pair([n + 2 for n in lengths], 28, 4, 128, 16)
    pair.step(lengths)  # prefill everything in one step
    for _ in range(2):
        out, ref = pair.step([1] * batch)
        assert rel_err(out, ref) < BF16_TOL


def test_float32_cache_is_exact():
    """A float32 cache uses exact fp32 products: agreement far under bf16 rounding."""
    pair = Pair([50, 9, 200], 8, 2, 64, 16, dtype=torch.float32)
    for sizes in ([20, 9, 150], [30, 0, 49], [0, 0, 1]):
        out, ref = pair.step(sizes)
        assert rel_err(out, ref) < 1e-4


def test_padding_rows_write_nothing_and_output_zero():
    """Decode padding (slot -1, KV length 0), as CUDA-graph buckets use it."""
    hq, hkv, d, block = 28, 4, 128, 16
    cache = torch.randn(10, LAYERS, 2, block, hkv, d, device="cuda").to(torch.bfloat16)
    before = cache.clone()
    meta = AttentionMetadata(
        query_start_loc=torch.arange(4, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([5, 0, 0], dtype=torch.int32, device="cuda"),
        block_tables=torch.tensor([[3], [0], [0]], dtype=torch.int32, device="cuda"),
        slot_mapping=torch.tensor([3 * block + 4, -1, -1], device="cuda"),
        max_query_len=1, max_seq_len=5, query_lens=[1, 1, 1], seq_lens_cpu=[5, 0, 0])
    q = torch.randn(3, hq, d, device="cuda").to(torch.bfloat16)
    k = torch.randn(3, hkv, d, device="cuda").to(torch.bfloat16)
    out = get_attention_backend("triton").forward(q, k, k.clone(), cache, LAYER, meta, d ** -0.5)
    changed = (cache != before).nonzero()[:, :4].unique(dim=0).tolist()
    assert changed == [[3, LAYER, 0, 4], [3, LAYER, 1, 4]]  # only the real token's K and V row
    assert out[1:].abs().max() == 0
    assert out[0].abs().max() > 0
