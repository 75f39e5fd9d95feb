"""Qwen2.5-VL: the Qwen2 text decoder (GQA, RMSNorm, SwiGLU, qkv bias, mRoPE) and the VLM wrapper
the engine drives (see docs/interfaces.md, "workers/models").

The decoder runs over a flat batch of T new tokens from any number of sequences; attention goes
through a paged-KV backend (``workers.engine.attention``) chosen by name. The wrapper may hold only
the vision tower (encode workers) or only the LM (prefill/decode workers): ``parts``.

Module names mirror the HF checkpoint (``visual.*``, ``language_model.*``, ``lm_head``) so the
loader only strips/rewrites key prefixes (see ``checkpoint_key_to_param``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from workers.engine.attention import AttentionBackend, AttentionMetadata, get_attention_backend
from workers.models.layers import GatedMLP, MRotaryEmbedding, RMSNorm, apply_rotary
from workers.models.qwen2_5_vl_vision import Qwen2_5_VisionTransformer

PARTS = ("vision", "lm")


def text_config_of(hf_config):
    return getattr(hf_config, "text_config", None) or hf_config


def ties_embeddings(hf_config) -> bool:
    tc = text_config_of(hf_config)
    return bool(getattr(hf_config, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))


class Qwen2Attention(nn.Module):
    """GQA self-attention with qkv bias and mRoPE; K/V live in the paged cache."""

    def __init__(self, tc, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = tc.num_attention_heads, tc.num_key_value_heads
        self.head_dim = tc.hidden_size // tc.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(tc.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(tc.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(tc.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, tc.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata,
                kv_cache: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache, self.layer_idx, attn, self.scale)
        return self.o_proj(out.reshape(t, -1))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, tc, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        self.self_attn = Qwen2Attention(tc, layer_idx)
        self.post_attention_layernorm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        self.mlp = GatedMLP(tc.hidden_size, tc.intermediate_size, tc.hidden_act, bias=False)

    def forward(self, x, cos, sin, attn, kv_cache, backend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, kv_cache, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


def mrope_section_of(tc) -> list[int]:
    params = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"rope type {rope_type!r} is not supported for Qwen VL models (only default mRoPE)")
    head_dim = tc.hidden_size // tc.num_attention_heads
    return list(params.get("mrope_section") or [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16])


def rope_theta_of_text(tc) -> float:
    params = getattr(tc, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(tc, "rope_theta", 1000000.0)))


class Qwen2TextModel(nn.Module):
    """Token embedding, decoder layers, final norm (no LM head)."""

    def __init__(self, tc) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(tc.vocab_size, tc.hidden_size)
        self.layers = nn.ModuleList([Qwen2DecoderLayer(tc, i) for i in range(tc.num_hidden_layers)])
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        head_dim = tc.hidden_size // tc.num_attention_heads
        self.rotary = MRotaryEmbedding(head_dim, rope_theta_of_text(tc), mrope_section_of(tc))

    def forward(self, h: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_cache: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        cos, sin = self.rotary(positions.to(h.device), h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, attn, kv_cache, backend)
        return self.norm(h)


class Qwen2_5_VLModel(nn.Module):
    """Qwen2.5-VL for the engine. Build through ``workers.models.loader.load_model``."""

    vision_tower_cls: type[nn.Module] = Qwen2_5_VisionTransformer

    def __init__(self, hf_config, parts: tuple[str, ...] = PARTS, attention_backend: str = "reference") -> None:
        super().__init__()
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ValueError(f"parts={parts!r}: use a non-empty subset of {PARTS}")
        tc = text_config_of(hf_config)
        self.hf_config = hf_config
        self.has_vision, self.has_lm = "vision" in parts, "lm" in parts
        self.image_token_id = int(hf_config.image_token_id)
        self.num_layers, self.num_kv_heads = tc.num_hidden_layers, tc.num_key_value_heads
        self.head_dim = tc.hidden_size // tc.num_attention_heads
        self.hidden_size, self.vocab_size = tc.hidden_size, tc.vocab_size
        self.spatial_merge_size = hf_config.vision_config.spatial_merge_size
        self.tie_word_embeddings = ties_embeddings(hf_config)
        if self.has_vision:
            self.visual = self.vision_tower_cls(hf_config.vision_config)
        if self.has_lm:
            self.language_model = Qwen2TextModel(tc)
            self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.attn_backend: AttentionBackend = get_attention_backend(attention_backend)

    # ------------------------------------------------------------------ weights

    def tie_weights(self) -> None:
        """Share the LM head with the token embedding when the checkpoint says so."""
        if self.has_lm and self.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @staticmethod
    def checkpoint_key_to_param(key: str) -> str | None:
        """Our parameter name for a checkpoint key, for both HF layouts; None if not ours.

        transformers 5.x: model.visual.*, model.language_model.*, lm_head.*
        transformers 4.x: visual.*, model.*, lm_head.*
        """
        for prefix, ours in (("model.visual.", "visual."), ("model.language_model.", "language_model."),
                             ("visual.", "visual."), ("model.", "language_model."), ("lm_head.", "lm_head.")):
            if key.startswith(prefix):
                return ours + key[len(prefix):]
        return None

    def set_attention_backend(self, backend: str | AttentionBackend) -> None:
        self.attn_backend = get_attention_backend(backend) if isinstance(backend, str) else backend

    # ------------------------------------------------------------------ vision

    def tokens_per_image(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * (h // self.spatial_merge_size) * (w // self.spatial_merge_size)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Vision tower + merger: one [n_i, hidden] tensor per image."""
        if not self.has_vision:
            raise RuntimeError("this model was loaded without the vision part (parts lacks 'vision')")
        grids = [tuple(int(x) for x in g) for g in torch.as_tensor(grid_thw).tolist()]
        embeds = self.visual(pixel_values, grids)
        return list(embeds.split([self.tokens_per_image(g) for g in grids], dim=0))

    # ------------------------------------------------------------------ prompt

    def expand_prompt(self, token_ids: list[int], num_tokens_per_image: list[int]) -> list[int]:
        """Replace the i-th image placeholder with num_tokens_per_image[i] placeholders."""
        found = sum(1 for t in token_ids if t == self.image_token_id)
        if found != len(num_tokens_per_image):
            raise ValueError(f"prompt has {found} image placeholders but {len(num_tokens_per_image)} images were given")
        out: list[int] = []
        counts = iter(num_tokens_per_image)
        for t in token_ids:
            out.extend([t] * next(counts) if t == self.image_token_id else [t])
        return out

    def mrope_positions(self, token_ids: list[int], grid_thws: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
        """3-D positions [3, L] of an expanded prompt and its rope delta.

        Text runs count up on all three axes; an image's tokens get (t, row, col) offsets from the
        position after the preceding text, and the text after it resumes at that start position
        + max(rows, cols). Decode position p (0-based index in the sequence) is p + rope_delta.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        image_at = (ids == self.image_token_id).nonzero().flatten().tolist()
        pieces, cursor, pos, k = [], 0, 0, 0
        for grid in grid_thws:
            n = self.tokens_per_image(tuple(grid))
            if k + n > len(image_at) or image_at[k + n - 1] - image_at[k] != n - 1:
                raise ValueError(f"image {len(pieces) // 2} needs {n} consecutive placeholder tokens in the prompt")
            start = image_at[k]
            pieces.append(torch.arange(start - cursor).expand(3, -1) + pos)
            pos += start - cursor
            grid_pos, span = self._image_positions(tuple(grid))
            pieces.append(grid_pos + pos)
            pos, cursor, k = pos + span, start + n, k + n
        if k != len(image_at):
            raise ValueError(f"prompt has {len(image_at)} image placeholder tokens but the images need {k}")
        pieces.append(torch.arange(len(token_ids) - cursor).expand(3, -1) + pos)
        positions = torch.cat(pieces, dim=1)
        delta = int(positions.max()) + 1 - len(token_ids) if len(token_ids) else 0
        return positions, delta

    def _image_positions(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        t, h, w = grid[0], grid[1] // self.spatial_merge_size, grid[2] // self.spatial_merge_size
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack((tt, hh, ww)).reshape(3, -1), max(h, w)

    # ------------------------------------------------------------------ LM

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_cache: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch of T new tokens (see AttentionMetadata).

        image_embeds: one row per image placeholder token in input_ids, in order.
        """
        if not self.has_lm:
            raise RuntimeError("this model was loaded without the LM part (parts lacks 'lm')")
        h = self.language_model.embed_tokens(input_ids)
        if image_embeds is not None and image_embeds.shape[0] > 0:
            h = self._scatter_images(input_ids, h, image_embeds)
        return self.language_model(h, positions, attn, kv_cache, self.attn_backend)

    def _scatter_images(self, input_ids: torch.Tensor, h: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        mask = input_ids == self.image_token_id
        n = int(mask.sum())
        if n != image_embeds.shape[0]:
            raise ValueError(f"{n} image placeholder tokens in the batch but {image_embeds.shape[0]} embedding rows")
        return h.masked_scatter(mask[:, None], image_embeds.to(device=h.device, dtype=h.dtype))

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()
