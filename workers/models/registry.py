"""Maps a checkpoint's ``config.architectures[0]`` to our implementation class.

Dispatch is on the architecture name the checkpoint declares: never on model-name substrings,
never on environment variables.
"""

from __future__ import annotations

import importlib

import torch.nn as nn

# architecture name (as in config.json) -> "module:Class" (imported lazily)
_ARCHITECTURES: dict[str, str] = {
    "Qwen2_5_VLForConditionalGeneration": "workers.models.qwen2_5_vl:Qwen2_5_VLModel",
    "Qwen2VLForConditionalGeneration": "workers.models.qwen2_vl:Qwen2VLModel",
}


class UnsupportedArchitecture(ValueError):
    """The checkpoint declares an architecture we have no implementation for."""


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def register_architecture(name: str, target: str) -> None:
    """Add an implementation: ``target`` is "package.module:ClassName"."""
    _ARCHITECTURES[name] = target


def architecture_of(hf_config) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise UnsupportedArchitecture(
            "config.json has no 'architectures' entry; add e.g. "
            f"\"architectures\": [\"Qwen2_5_VLForConditionalGeneration\"] (supported: {supported_architectures()})")
    return archs[0]


def resolve(hf_config) -> type[nn.Module]:
    """The model class for ``hf_config.architectures[0]``."""
    arch = architecture_of(hf_config)
    if arch not in _ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {arch!r} is not supported; supported: {supported_architectures()}")
    module_name, class_name = _ARCHITECTURES[arch].split(":")
    return getattr(importlib.import_module(module_name), class_name)
