"""Per-request state of the engine and the small records it hands out."""

from __future__ import annotations

import bisect
import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from common.protocol import SamplingParams

# Token id stored for prompt tokens an imported request never saw (its KV came from elsewhere).
UNKNOWN_TOKEN = -1


@dataclass(frozen=True)
class MMItem:
    """One encoded media item: its LM-space embeddings and what the LM needs to place them."""

    embeds: torch.Tensor  # [num_tokens, hidden]
    num_tokens: int
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. {"grid_thw": [t, h, w]}
    content_hash: str = ""


def image_hash(image) -> str:
    """Content hash of a PIL image (mode, size and pixels), for caches keyed by content."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def grid_of(item: MMItem) -> tuple[int, int, int]:
    """The (t, h, w) patch grid an MMItem was encoded from (needed for mRoPE positions)."""
    grid = item.extras.get("grid_thw")
    if grid is None or len(grid) != 3:
        raise ValueError(f"image embedding {item.content_hash or ''} lacks extras['grid_thw'] = [t, h, w]")
    return tuple(int(x) for x in grid)


@dataclass(frozen=True)
class ExportedKV:
    """A finished prefill-only request's pinned KV: ``block_ids`` hold ``num_tokens`` tokens."""

    block_ids: list[int]
    num_tokens: int


@dataclass
class StepOutput:
    """What one request produced in one engine step."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None (running, or handed off)
    prompt_tokens: int
    kv: ExportedKV | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PINNED = "pinned"  # prefill-only, done, KV kept for export
    FINISHED = "finished"


class Request:
    """Tokens, KV blocks, positions and image embeddings of one sequence.

    ``token_ids`` is prompt (placeholders expanded) + generated tokens. ``num_computed`` tokens have
    their KV in ``block_ids``. Positions: prompt token p uses column p of ``positions`` ([3, L],
    precomputed mRoPE table); any later token p uses p + ``rope_delta`` on all three axes.
    """

    def __init__(self, request_id: str, token_ids: list[int], sampling: SamplingParams,
                 max_tokens: int, positions: torch.Tensor | None = None, rope_delta: int = 0,
                 mm_positions: list[int] | None = None, mm_embeds: torch.Tensor | None = None,
                 prefill_only: bool = False, eos_ids: frozenset[int] = frozenset()) -> None:
        self.request_id = request_id
        self.token_ids = list(token_ids)
        self.prompt_len = len(token_ids)
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.positions = positions
        self.rope_delta = rope_delta
        self.mm_positions = mm_positions or []  # sorted prompt indices of image placeholder tokens
        self.mm_embeds = mm_embeds  # [len(mm_positions), hidden], rows in the same order
        self.prefill_only = prefill_only
        self.stop_ids = frozenset(sampling.stop_token_ids) | (frozenset() if sampling.ignore_eos else eos_ids)
        self.num_computed = 0
        self.block_ids: list[int] = []
        self.status = Status.WAITING
        self.recomputable = True  # False when the prompt's KV was imported (its tokens are unknown)
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_pending(self) -> int:
        """Tokens whose KV is not yet computed (1 while decoding)."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.num_pending == 1 and self.num_outputs > 0

    # ------------------------------------------------------------------ chunk inputs
    def chunk_positions(self, start: int, end: int) -> torch.Tensor:
        """mRoPE positions [3, end-start] of tokens start..end-1."""
        table_end = self.positions.shape[1] if self.positions is not None else 0
        parts = []
        if start < table_end:
            parts.append(self.positions[:, start:min(end, table_end)])
        if end > table_end:
            tail = torch.arange(max(start, table_end), end, dtype=torch.long) + self.rope_delta
            parts.append(tail.unsqueeze(0).expand(3, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def chunk_image_rows(self, start: int, end: int) -> torch.Tensor | None:
        """Image embedding rows of the placeholders among tokens start..end-1 (may cut an image)."""
        if self.mm_embeds is None:
            return None
        lo = bisect.bisect_left(self.mm_positions, start)
        hi = bisect.bisect_left(self.mm_positions, end)
        return self.mm_embeds[lo:hi] if hi > lo else None

    # ------------------------------------------------------------------ progress
    def append_token(self, token: int) -> str | None:
        """Add a sampled token; return the finish reason it causes, if any."""
        self.token_ids.append(token)
        if token in self.stop_ids:
            return "stop"
        if self.num_outputs >= self.max_tokens:
            return "length"
        return None

    def reset_for_recompute(self) -> None:
        """After preemption: all KV is gone, prompt + outputs are prefilled again."""
        self.num_computed = 0
        self.block_ids = []
        self.status = Status.WAITING
