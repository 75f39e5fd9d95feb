"""Engine configuration: one frozen dataclass that validates itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = ("float32", "float16", "bfloat16")
_PARTS = ("vision", "lm")
_LOAD_FORMATS = ("auto", "dummy")

# On CPU the KV cache comes out of host RAM shared with everything else: keep it small unless told.
DEFAULT_CPU_KV_CACHE_MB = 256
# On a GPU without an explicit size, use this fraction of the memory still free after loading.
DEFAULT_GPU_KV_FRACTION = 0.85


@dataclass(frozen=True)
class EngineConfig:
    """How an LLMEngine loads its model and sizes its KV cache and batches.

    KV size: ``num_kv_blocks`` wins; else ``kv_cache_mb``; else a default (256 MiB on CPU,
    85% of free GPU memory on CUDA). ``max_model_len`` (None = the checkpoint's
    max_position_embeddings) caps prompt + output; it is also capped by the KV cache capacity.
    """

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_mb: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    load_format: str = "auto"
    parts: tuple[str, ...] = ("vision", "lm")
    attention_backend: str = "reference"
    # Capture decode steps as CUDA graphs (CUDA only, with a graph-safe backend such as "triton").
    cuda_graphs: bool = True
    # torch.compile the vision blocks (CUDA only): ~2x images/s at batch >= 8, ~10 s more start-up.
    compile_vision: bool = True
    # Run the vision tower through CUDA graphs, one per image-size signature, captured on first use
    # (CUDA only; at most 8 graphs, batches of at most 16384 patches; larger ones run eagerly).
    vision_cuda_graphs: bool = True
    # torch.compile the LM decoder layers (CUDA only, with a graph-safe backend such as "triton"):
    # fuses norms, rotary and the MLP's elementwise work; +20% decode tokens/s at batch 1.
    compile_lm: bool = True
    # Queue each decode-only step before reading the previous one's tokens, so the host's work
    # overlaps the device's (see LLMEngine). None: on for CUDA, off elsewhere (on a CPU nothing
    # runs asynchronously, so it would only delay outputs); True/False force it (tests: True).
    overlap_decode: bool | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("EngineConfig.model: give the checkpoint directory")
        if self.dtype not in _DTYPES:
            raise ValueError(f"EngineConfig.dtype={self.dtype!r}: choose one of {_DTYPES}")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"EngineConfig.load_format={self.load_format!r}: choose one of {_LOAD_FORMATS}")
        object.__setattr__(self, "parts", tuple(self.parts))
        bad = [p for p in self.parts if p not in _PARTS] or ([] if self.parts else ["<empty>"])
        if bad:
            raise ValueError(f"EngineConfig.parts has {bad}: use a non-empty subset of {_PARTS}")
        self._check_positive()

    def _check_positive(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_kv_blocks", "kv_cache_mb", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1 (or None), got {value}")

    @property
    def has_lm(self) -> bool:
        return "lm" in self.parts

    @property
    def has_vision(self) -> bool:
        return "vision" in self.parts


# ----------------------------------------------------------------------------- derived settings


def text_config(hf_config):
    """The LM part of a (possibly multimodal) HF config."""
    return getattr(hf_config, "text_config", None) or hf_config


def max_model_len(config: EngineConfig, hf_config) -> int:
    """The context (prompt + output) the engine allows: the config's, else the checkpoint's."""
    native = getattr(text_config(hf_config), "max_position_embeddings", None) or \
        getattr(hf_config, "max_position_embeddings", None) or 32768
    return min(config.max_model_len, native) if config.max_model_len else int(native)


def eos_token_ids(model_dir: str, hf_config) -> frozenset[int]:
    """End-of-sequence ids as HF generate sees them: generation_config.json, else config.json."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
    except (OSError, ValueError):  # no generation_config.json in the checkpoint
        eos = getattr(text_config(hf_config), "eos_token_id", None) or getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def kv_block_bytes(config: EngineConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes of one block: all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * config.block_size * num_kv_heads * head_dim * elem


def num_kv_blocks(config: EngineConfig, model, dtype: torch.dtype, device: torch.device) -> int:
    """How many KV blocks to allocate (see EngineConfig)."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    per_block = kv_block_bytes(config, model.num_layers, model.num_kv_heads, model.head_dim, dtype)
    if config.kv_cache_mb:
        budget = config.kv_cache_mb * (1 << 20)
    elif device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * DEFAULT_GPU_KV_FRACTION)
    else:
        budget = DEFAULT_CPU_KV_CACHE_MB * (1 << 20)
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(f"a KV cache of {budget >> 20} MiB holds no block of {per_block} bytes: raise kv_cache_mb")
    return int(blocks)
