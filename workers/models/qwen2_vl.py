"""Qwen2-VL: the same text decoder and wrapper as Qwen2.5-VL (imported, not repeated) with the
Qwen2-VL vision tower (full attention, LayerNorm, QuickGELU MLP)."""

from __future__ import annotations

from workers.models.qwen2_5_vl import Qwen2_5_VLModel
from workers.models.qwen2_vl_vision import Qwen2VisionTransformer


class Qwen2VLModel(Qwen2_5_VLModel):
    """Qwen2-VL for the engine. Build through ``workers.models.loader.load_model``."""

    vision_tower_cls = Qwen2VisionTransformer
