"""Image preprocessing: the checkpoint's own HF image processor (resize to multiples of
patch * merge, normalize, cut into flattened patches) -> pixel_values and grid_thw."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor


class ImageProcessor:
    """Wraps ``transformers.AutoImageProcessor`` of a checkpoint directory.

    (AutoProcessor would also build a video processor, which needs torchvision; we need images only.)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.hf = AutoImageProcessor.from_pretrained(self.path)
        self.merge_size = int(getattr(self.hf, "merge_size", 2))

    def process(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB images -> (pixel_values [sum patches, C*Tp*P*P] float32, grid_thw LongTensor[N, 3])."""
        if not images:
            raise ValueError("process() needs at least one image")
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        out = self.hf(images=rgb, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].to(torch.long)

    def num_tokens(self, grid_thw: tuple[int, int, int] | list[int]) -> int:
        """LM tokens an image of this grid expands to."""
        t, h, w = (int(x) for x in grid_thw)
        return t * (h // self.merge_size) * (w // self.merge_size)
