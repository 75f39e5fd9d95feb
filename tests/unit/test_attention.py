"""The reference paged-attention backend against plain dense causal attention."""

from __future__ import annotations

import math

import pytest
import torch

from workers.engine.attention import AttentionMetadata, available_attention_backends, get_attention_backend

HQ, HKV, D, BLOCK, LAYERS = 4, 2, 8, 4, 2


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Textbook softmax(q k^T * scale + causal) v for one whole sequence, GQA by head repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    n = q.shape[0]
    scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_tables(lengths: list[int], num_blocks: int, gen: torch.Generator) -> list[list[int]]:
    """Disjoint, shuffled (non-contiguous) block tables, so block-table indexing is really tested."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in lengths:
        need = math.ceil(n / BLOCK)
        tables.append(perm[used:used + need])
        used += need
    return tables


def run_schedule(lengths, chunks_per_step, q, k, v, kv_cache, tables, layer=1):
    """Feed each sequence's tokens in the given chunk sizes, several sequences per step."""
    backend, scale = get_attention_backend("reference"), D ** -0.5
    done = [0] * len(lengths)
    outs = [[] for _ in lengths]
    for step in chunks_per_step:
        seqs = [i for i, n in enumerate(step) if n > 0]
        qlens = [step[i] for i in seqs]
        seq_lens = [done[i] + step[i] for i in seqs]
        meta = AttentionMetadata.build(qlens, seq_lens, [tables[i] for i in seqs], BLOCK)
        sl = [slice(done[i], done[i] + step[i]) for i in seqs]
        out = backend.forward(torch.cat([q[i][s] for i, s in zip(seqs, sl)]),
                              torch.cat([k[i][s] for i, s in zip(seqs, sl)]),
                              torch.cat([v[i][s] for i, s in zip(seqs, sl)]), kv_cache, layer, meta, scale)
        for i, piece in zip(seqs, out.split(qlens)):
            outs[i].append(piece)
            done[i] += step[i]
    assert done == lengths
    return [torch.cat(o) for o in outs]


def test_reference_backend_matches_dense_causal_with_chunks_and_gqa():
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 23, 13]
    # Step 1: first chunks (context 0); step 2: continuation chunks (context > 0, crossing
    # blocks); steps 3-5: mixed single-token decodes and the rest of a prefill.
    schedule = [[3, 10, 13], [2, 9, 0], [1, 4, 0], [1, 0, 0], [0, 0, 0]]
    assert [sum(col) for col in zip(*schedule)] == lengths
    q = [torch.randn(n, HQ, D, generator=gen) for n in lengths]
    k = [torch.randn(n, HKV, D, generator=gen) for n in lengths]
    v = [torch.randn(n, HKV, D, generator=gen) for n in lengths]
    kv_cache = torch.zeros(20, LAYERS, 2, BLOCK, HKV, D)
    tables = make_tables(lengths, 20, gen)
    outs = run_schedule(lengths, schedule[:-1], q, k, v, kv_cache, tables)
    for i in range(len(lengths)):
        expect = dense_causal(q[i], k[i], v[i], D ** -0.5)
        torch.testing.assert_close(outs[i], expect, atol=1e-5, rtol=1e-5)
    # The other layer's slice of the cache is untouched.
    assert kv_cache[:, 0].abs().sum() == 0


def test_kv_lands_in_its_slots():
    gen = torch.Generator().manual_seed(1)
    kv_cache = torch.zeros(6, LAYERS, 2, BLOCK, HKV, D)
    tables = [[4, 1]]
    k, v = torch.randn(6, HKV, D, generator=gen), torch.randn(6, HKV, D, generator=gen)
    meta = AttentionMetadata.build([6], [6], tables, BLOCK)
    assert meta.slot_mapping.tolist() == [16, 17, 18, 19, 4, 5]
    get_attention_backend().forward(torch.randn(6, HQ, D), k, v, kv_cache, 0, meta, 1.0)
    torch.testing.assert_close(kv_cache[4, 0, 0], k[:4])
    torch.testing.assert_close(kv_cache[1, 0, 1, :2], v[4:])
    assert kv_cache[1, 0, :, 2:].abs().sum() == 0


def test_padding_slots_are_not_written():
    kv_cache = torch.zeros(2, 1, 2, BLOCK, HKV, D)
    meta = AttentionMetadata.build([2], [2], [[0]], BLOCK)
    meta.slot_mapping = torch.tensor([0, -1])
    meta.query_lens, meta.seq_lens_cpu, meta.seq_lens = [1], [1], torch.tensor([1], dtype=torch.int32)
    meta.query_start_loc = torch.tensor([0, 1], dtype=torch.int32)
    k = torch.ones(2, HKV, D)
    get_attention_backend().forward(torch.ones(2, HQ, D), k, k, kv_cache, 0, meta, 1.0)
    assert kv_cache[0, 0, 0, 0].eq(1).all() and kv_cache[0, 0, 0, 1:].eq(0).all()


def test_registry_and_metadata_errors():
    assert "reference" in available_attention_backends()
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("flash")
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionMetadata.build([5], [5], [[0]], BLOCK)
    with pytest.raises(ValueError, match="exceeds"):
        AttentionMetadata.build([6], [5], [[0, 1]], BLOCK)
