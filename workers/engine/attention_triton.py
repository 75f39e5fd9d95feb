"""Triton paged-attention backend for CUDA ("triton" in the attention registry).

Same contract as the reference backend (see ``workers.engine.attention``): write the new K/V rows
into the block-major cache ``[num_blocks, layers, 2, block_size, kv_heads, head_dim]``, then causal
attention of each sequence's new queries over its whole KV. Three kernels:

1. ``_store_kv``: one program per new token scatters its K and V rows (negative slot = padding).
2. ``_decode_split`` + ``_decode_merge`` (every sequence has exactly one new token): flash-decoding.
   Each program takes one (sequence, KV head, split of the context); the GQA group's query heads
   ride together in one tile so each K/V row is read once per group. The split count depends only
   on the batch size, so the launch is the same for any context length (CUDA-graph safe).
3. ``_prefill`` (packed varlen queries, paged context, chunked prefill): a flash-attention tile of
   BLOCK_M queries of one head walks the sequence's blocks up to its causal limit.

No host synchronisation: everything the kernels need comes from device tensors in the metadata.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.engine.attention import AttentionMetadata

_LOG2E = 1.4426950408889634
_TARGET_PROGRAMS = 264  # about two waves of programs on a 132-SM H100


@triton.jit
def _store_kv(k_ptr, v_ptr, cache_ptr, slot_ptr, layer_off,
              stride_kt, stride_kh, stride_vt, stride_vh,
              s_block, s_kv, s_slot, s_head,
              BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr, HKV_P: tl.constexpr,
              D: tl.constexpr, D_P: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    h = tl.arange(0, HKV_P)[:, None]
    d = tl.arange(0, D_P)[None, :]
    mask = (h < HKV) & (d < D) & (slot >= 0)
    blk = tl.maximum(slot, 0) // BLOCK_SIZE
    off = tl.maximum(slot, 0) % BLOCK_SIZE
    dst = cache_ptr + blk.to(tl.int64) * s_block + layer_off + off * s_slot + h * s_head + d
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + s_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_split(q_ptr, cache_ptr, bt_ptr, seqlen_ptr, acc_ptr, ml_ptr, layer_off, qk_scale,
                  stride_qt, stride_qh, s_block, s_kv, s_slot, s_head, stride_bt,
                  BLOCK_SIZE: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, HQ: tl.constexpr,
                  D: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(seqlen_ptr + b)
    per = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
    lo = sp * per
    hi = tl.minimum(lo + per, seq_len)
    g = tl.arange(0, G_P)
    d = tl.arange(0, D_P)
    dmask = d < D
    heads = hkv * G + g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=(g[:, None] < G) & dmask[None, :], other=0.0).to(cache_ptr.dtype.element_ty)
    m = tl.full([G_P], float("-inf"), tl.float32)
    l = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, D_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        row = page.to(tl.int64) * s_block + layer_off + (pos % BLOCK_SIZE) * s_slot + hkv * s_head
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + row[:, None] + s_kv + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new
    out_row = (b * HQ + heads).to(tl.int64) * SPLITS + sp  # [G_P] rows of [T, HQ, SPLITS]
    gmask = g < G
    tl.store(acc_ptr + out_row[:, None] * D_P + d[None, :], acc, mask=gmask[:, None])
    tl.store(ml_ptr + out_row * 2, m, mask=gmask)
    tl.store(ml_ptr + out_row * 2 + 1, l, mask=gmask)


@triton.jit
def _decode_merge(acc_ptr, ml_ptr, o_ptr, stride_ot, stride_oh,
                  HQ: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D_P)
    rows = (b * HQ + h).to(tl.int64) * SPLITS + s
    m = tl.load(ml_ptr + rows * 2)
    l = tl.load(ml_ptr + rows * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    total = tl.sum(l * w, 0)
    acc = tl.load(acc_ptr + rows[:, None] * D_P + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # empty sequence -> 0
    tl.store(o_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d,
             out.to(o_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _prefill(q_ptr, cache_ptr, o_ptr, bt_ptr, qstart_ptr, seqlen_ptr, layer_off, qk_scale,
             stride_qt, stride_qh, stride_ot, stride_oh, s_block, s_kv, s_slot, s_head, stride_bt,
             BLOCK_SIZE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    mt = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(qstart_ptr + b)
    q_len = tl.load(qstart_ptr + b + 1) - q0
    seq_len = tl.load(seqlen_ptr + b)
    ctx = seq_len - q_len
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    d = tl.arange(0, D_P)
    dmask = d < D
    q = tl.load(q_ptr + (q0 + offs_m).to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=m_valid[:, None] & dmask[None, :], other=0.0).to(cache_ptr.dtype.element_ty)
    q_pos = ctx + offs_m
    # Tiles past this sequence's queries run no iterations (their stores are masked off).
    kv_end = tl.where(mt * BLOCK_M < q_len, tl.minimum(seq_len, ctx + (mt + 1) * BLOCK_M), 0)
    hkv = h // G
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < kv_end
        page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        row = page.to(tl.int64) * s_block + layer_off + (pos % BLOCK_SIZE) * s_slot + hkv * s_head
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + row[:, None] + s_kv + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + (q0 + offs_m).to(tl.int64)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_valid[:, None] & dmask[None, :])


def _p2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


def _dot_precision(q: torch.Tensor) -> str:
    # float32 caches (tests, debugging) get exact fp32 products; bf16/fp16 use the tensor cores.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def decode_splits(num_seqs: int, num_kv_heads: int) -> int:
    """Context splits per (sequence, KV head): enough programs to fill the GPU, a power of 2."""
    want = max(1, _TARGET_PROGRAMS // max(1, num_seqs * num_kv_heads))
    return min(32, _p2(want))


class TritonAttentionBackend:
    """Paged attention in Triton (CUDA only). Graph-safe for decode batches (see cuda_graphs)."""

    name = "triton"
    supports_cuda_graphs = True

    @torch.compiler.disable  # compiled model code calls the kernels as they are (a graph break)
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                layer_idx: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if not q.is_cuda:
            raise ValueError("the 'triton' attention backend runs on CUDA tensors; use 'reference' on CPU")
        store_kv(kv_cache, layer_idx, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        if q.shape[0] == 0:
            return out
        if meta.max_query_len == 1:
            paged_decode(q, kv_cache, layer_idx, meta, scale, out)
        else:
            paged_prefill(q, kv_cache, layer_idx, meta, scale, out)
        return out


def _cache_strides(kv_cache: torch.Tensor, layer_idx: int) -> tuple[int, ...]:
    s = kv_cache.stride()
    if s[-1] != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    return layer_idx * s[1], s[0], s[2], s[3], s[4]


def store_kv(kv_cache: torch.Tensor, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows ([T, Hkv, D]) into their slots; negative slots are skipped."""
    t, hkv, d = k.shape
    if t == 0:
        return
    layer_off, s_block, s_kv, s_slot, s_head = _cache_strides(kv_cache, layer_idx)
    _store_kv[(t,)](k, v, kv_cache, slot_mapping, layer_off, k.stride(0), k.stride(1),
                    v.stride(0), v.stride(1), s_block, s_kv, s_slot, s_head,
                    BLOCK_SIZE=kv_cache.shape[3], HKV=hkv, HKV_P=_p2(hkv), D=d, D_P=_p2(d))


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, layer_idx: int, meta: AttentionMetadata,
                 scale: float, out: torch.Tensor) -> None:
    """One new token per sequence (q row b belongs to sequence b): split-KV then merge."""
    t, hq, d = q.shape
    hkv = kv_cache.shape[4]
    g, d_p = hq // hkv, _p2(d, 16)
    splits = decode_splits(t, hkv)
    acc = torch.empty(t, hq, splits, d_p, dtype=torch.float32, device=q.device)
    ml = torch.empty(t, hq, splits, 2, dtype=torch.float32, device=q.device)
    layer_off, s_block, s_kv, s_slot, s_head = _cache_strides(kv_cache, layer_idx)
    bt = meta.block_tables
    _decode_split[(t, hkv, splits)](
        q, kv_cache, bt, meta.seq_lens, acc, ml, layer_off, scale * _LOG2E,
        q.stride(0), q.stride(1), s_block, s_kv, s_slot, s_head, bt.stride(0),
        BLOCK_SIZE=kv_cache.shape[3], G=g, G_P=_p2(g, 16), HQ=hq, D=d, D_P=d_p,
        BLOCK_N=64, SPLITS=splits, DOT_PREC=_dot_precision(q), num_warps=4)
    _decode_merge[(t, hq)](acc, ml, out, out.stride(0), out.stride(1),
                           HQ=hq, D=d, D_P=d_p, SPLITS=splits, num_warps=4)


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, layer_idx: int, meta: AttentionMetadata,
                  scale: float, out: torch.Tensor) -> None:
    """Packed varlen queries over each sequence's paged KV (context + new tokens), causal."""
    t, hq, d = q.shape
    hkv = kv_cache.shape[4]
    block_m = 64 if meta.max_query_len > 16 else 16
    layer_off, s_block, s_kv, s_slot, s_head = _cache_strides(kv_cache, layer_idx)
    bt = meta.block_tables
    grid = (triton.cdiv(meta.max_query_len, block_m), bt.shape[0], hq)
    _prefill[grid](
        q, kv_cache, out, bt, meta.query_start_loc, meta.seq_lens, layer_off, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), s_block, s_kv, s_slot, s_head,
        bt.stride(0), BLOCK_SIZE=kv_cache.shape[3], G=hq // hkv, D=d, D_P=_p2(d, 16),
        BLOCK_M=block_m, BLOCK_N=64, DOT_PREC=_dot_precision(q), num_warps=4, num_stages=2)
