"""Paged attention: the metadata the runner builds for a packed batch, and the backends.

A batch packs T new tokens of B sequences into one flat tensor. Each backend:
  1. writes the new K/V rows into the paged cache at ``slot_mapping`` (block_id * block_size + offset);
  2. runs causal attention of each sequence's new queries over that sequence's whole KV
     (a new query i of a sequence whose KV already held c tokens sees KV positions 0..c+i).

KV cache layout (block-major, so one request's block is contiguous across layers, which keeps the
number of transfer operations independent of the number of layers):
    kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

Backends are chosen by name through ``get_attention_backend`` (never by environment variables).
"reference" runs anywhere (CPU tests, any GPU); a fast GPU backend registers itself under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "AttentionMetadata",
    "AttentionBackend",
    "ReferenceAttentionBackend",
    "register_attention_backend",
    "get_attention_backend",
    "available_attention_backends",
]


@dataclass
class AttentionMetadata:
    """Describes one packed batch of new tokens for the attention backends.

    query_start_loc: int32[B+1], offsets of each sequence's new tokens in the packed batch.
    seq_lens: int32[B], KV length of each sequence after this step (context + new tokens).
    block_tables: int32[B, max_blocks], block ids of each sequence, in order (pad with any id).
    slot_mapping: int64[T], cache slot of each new token (block_id * block_size + offset);
        a negative slot marks a padding token whose K/V is not written.
    query_lens / seq_lens_cpu: the same lengths as Python lists (no device sync needed).
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_lens: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens))

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """Build metadata from plain lists (the new tokens of a sequence are its last KV positions).

        A convenience for tests and simple runners: slot of the j-th new token of sequence b is
        the slot of KV position seq_lens[b] - query_lens[b] + j in that sequence's block table.
        """
        _check_lengths(query_lens, seq_lens, block_tables, block_size)
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        slots = [_slot(table, pos, block_size)
                 for q, s, table in zip(query_lens, seq_lens, block_tables)
                 for pos in range(s - q, s)]
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )


def _slot(table: list[int], pos: int, block_size: int) -> int:
    return table[pos // block_size] * block_size + pos % block_size


def _check_lengths(query_lens, seq_lens, block_tables, block_size) -> None:
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
    for q, s, table in zip(query_lens, seq_lens, block_tables):
        if q > s:
            raise ValueError(f"query length {q} exceeds sequence length {s}")
        if len(table) * block_size < s:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {s} tokens")


class AttentionBackend(Protocol):
    """What a model layer calls; see the module docstring for the semantics."""

    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                layer_idx: int, meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


def write_kv(kv_cache: torch.Tensor, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the new K/V rows into their cache slots (negative slots are padding, skipped)."""
    block_size = kv_cache.shape[3]
    slots = slot_mapping.to(device=kv_cache.device, dtype=torch.long)
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, layer_idx, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[blocks, layer_idx, 1, offsets] = v.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, layer_idx: int, block_table: torch.Tensor,
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V ([seq_len, Hkv, D] each), gathered from its blocks in order."""
    block_size = kv_cache.shape[3]
    n_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:n_blocks].to(device=kv_cache.device, dtype=torch.long)
    kv = kv_cache[ids, layer_idx]  # [n_blocks, 2, block_size, Hkv, D]
    k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:seq_len]
    v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:seq_len]
    return k, v


def causal_offset_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """Bool mask [q_len, kv_len]: query i (absolute position kv_len - q_len + i) sees keys <= it.

    None when every query sees every key (a single decode token), so SDPA takes its fast path.
    """
    if q_len == 1:
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    return torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]


class ReferenceAttentionBackend:
    """Gather-by-block-table + SDPA, one sequence at a time. Correct anywhere; not fast."""

    name = "reference"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                layer_idx: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(kv_cache, layer_idx, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        start = 0
        for b, (q_len, kv_len) in enumerate(zip(meta.query_lens, meta.seq_lens_cpu)):
            if q_len == 0:
                continue
            k_seq, v_seq = gather_kv(kv_cache, layer_idx, meta.block_tables[b], kv_len)
            out[start:start + q_len] = self._attend(q[start:start + q_len], k_seq, v_seq, scale)
            start += q_len
        return out

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        mask = causal_offset_mask(q.shape[0], k.shape[0], q.device)
        # SDPA wants [heads, len, dim]; enable_gqa lets Hq be a multiple of Hkv without a copy.
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.to(q.dtype).transpose(0, 1), v.to(q.dtype).transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return o.transpose(0, 1)


def _triton_backend() -> AttentionBackend:
    """The Triton paged-attention backend (CUDA); imported only when asked for."""
    try:
        from workers.engine.attention_triton import TritonAttentionBackend
    except ImportError as exc:  # no triton: CPU-only torch build
        raise ValueError(f"attention backend 'triton' needs a CUDA build of torch with triton ({exc}); "
                         "use 'reference' on this machine") from exc
    return TritonAttentionBackend()


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"reference": ReferenceAttentionBackend,
                                                        "triton": _triton_backend}


def register_attention_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    """Make a backend selectable by name (e.g. a Triton backend registers itself on import)."""
    _BACKENDS[name] = factory


def available_attention_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_attention_backend(name: str = "reference") -> AttentionBackend:
    """A new instance of the backend registered under ``name``."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {available_attention_backends()}")
    return _BACKENDS[name]()
