"""Load our model implementations from unchanged HF checkpoints.

Steps of ``load_model``:
  1. read config.json (``transformers.AutoConfig``) and pick the class from ``architectures``;
  2. build the model on the meta device (no memory, no init cost, even for 7B shapes);
  3. materialize it on the target device and fill it: from safetensors (single file or sharded
     index, either HF key layout; only the tensors of the requested parts are read, one key at a
     time) or, for ``load_format="dummy"``, with random values at the real shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import AutoConfig

from workers.models.layers import RMSNorm
from workers.models.registry import resolve

LOAD_FORMATS = ("auto", "dummy")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_config(path: str | Path):
    """The checkpoint's HF config (local directory only; nothing is downloaded)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; give a HF checkpoint directory")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               parts: tuple[str, ...] = ("vision", "lm"), load_format: str = "auto",
               attention_backend: str = "reference", seed: int = 0) -> nn.Module:
    """Build and fill the model for checkpoint ``path`` (see the module docstring).

    device="meta" with load_format="dummy" returns an unmaterialized model (shapes only).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r}: choose one of {LOAD_FORMATS}")
    hf_config = load_config(path)
    cls = resolve(hf_config)
    with torch.device("meta"):
        model = cls(hf_config, parts=tuple(parts), attention_backend=attention_backend)
    model = model.to(dtype=dtype).requires_grad_(False)  # inference only
    if torch.device(device).type == "meta":
        if load_format != "dummy":
            raise ValueError("device='meta' only makes sense with load_format='dummy'")
        model.tie_weights()
        return model.eval()
    model = model.to_empty(device=device)
    model.tie_weights()
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_weights(model, Path(path))
    return model.eval()


# ----------------------------------------------------------------------------- dummy weights


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights at the real shapes: norms = 1, biases = 0, everything else N(0, 0.02).

    Values are drawn in float32 chunks on the target device so bf16 models get the same numbers
    and large models do not need a second full-size buffer.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.zero_()
        else:
            _fill_normal(param, gen)
    for module in model.modules():
        if isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)


def _fill_normal(param: torch.Tensor, gen: torch.Generator, chunk: int = 1 << 24) -> None:
    flat = param.view(-1)
    for start in range(0, flat.numel(), chunk):
        piece = flat[start:start + chunk]
        piece.copy_(torch.randn(piece.numel(), generator=gen, device=piece.device) * 0.02)


# ----------------------------------------------------------------------------- safetensors


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file, from the sharded index or the single file's header."""
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return {key: path / name for key, name in weight_map.items()}
    if (path / SINGLE_FILE).is_file():
        with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
            return {key: path / SINGLE_FILE for key in f.keys()}
    raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE}; is this a HF checkpoint directory?")


def plan_keys(model: nn.Module, files: dict[str, Path]) -> dict[str, str]:
    """Our parameter name -> checkpoint key, for the parameters this model holds.

    Checkpoint keys of parts the model does not hold (e.g. LM weights in a vision-only model) are
    skipped without being read; a key of a held part that matches no parameter is an error.
    """
    params = dict(model.named_parameters())
    plan: dict[str, str] = {}
    for key in files:
        ours = model.checkpoint_key_to_param(key)
        if ours is None or not _in_held_part(model, ours):
            continue
        if ours == "lm_head.weight" and model.tie_word_embeddings:
            continue  # tied: the head is the embedding
        if ours not in params:
            raise ValueError(f"checkpoint tensor {key!r} has no place in {type(model).__name__}; "
                             "does config.json's 'architectures' match the weights?")
        plan[ours] = key
    missing = sorted(set(params) - set(plan) - _tied_names(model))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    return plan


def _in_held_part(model: nn.Module, ours: str) -> bool:
    if ours.startswith("visual."):
        return model.has_vision
    return model.has_lm


def _tied_names(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if model.has_lm and model.tie_word_embeddings else set()


@torch.no_grad()
def load_weights(model: nn.Module, path: Path) -> None:
    """Copy every tensor the model needs from the checkpoint, one key at a time."""
    files = checkpoint_files(path)
    plan = plan_keys(model, files)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, key in plan.items():
        by_file.setdefault(files[key], []).append((ours, key))
    for file, pairs in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for ours, key in pairs:
                _copy_into(params[ours], f.get_tensor(key), key)


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, key: str) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, "
                         f"the model expects {tuple(param.shape)}; config.json does not match the weights")
    param.copy_(tensor)
