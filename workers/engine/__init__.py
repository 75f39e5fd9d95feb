"""Triad engine: scheduler, paged KV cache, model runner, attention, sampler.

Import the pieces from their modules (``workers.engine.engine.LLMEngine``, ...) or from here;
the names below are loaded lazily so that importing a submodule (e.g. ``attention``) does not pull
in the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLMEngine": "workers.engine.engine",
    "EngineConfig": "workers.engine.config",
    "MMItem": "workers.engine.request",
    "ExportedKV": "workers.engine.request",
    "StepOutput": "workers.engine.request",
    "OutOfBlocks": "workers.engine.block_manager",
    "BlockManager": "workers.engine.block_manager",
    "Prompt": "workers.engine.offline",
    "generate": "workers.engine.offline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'workers.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
