"""Session fixtures for unit tests: tiny random Qwen2.5-VL / Qwen2-VL checkpoints and test images.

The checkpoints are real HF model directories (config, safetensors, tokenizer with chat template,
image processor config) written by ``tools.tinyvlm.build.make_random_checkpoint`` into a temp dir.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tools.tinyvlm.build import make_random_checkpoint


def draw_test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB picture with overlapping coloured rectangles and a circle, so that
    every vision window sees different content."""
    im = Image.new("RGB", (width, height), ((seed * 67) % 256, 90, 160))
    d = ImageDraw.Draw(im)
    for i in range(9):
        x0, y0 = (i * width) // 10, (i * height * 7 // 10 + seed * 13) % height
        colour = ((i * 37 + seed * 11) % 256, (i * 91 + 40) % 256, (i * 53 + seed * 29) % 256)
        d.rectangle([x0, y0, x0 + width // 4, y0 + height // 5], fill=colour)
    d.ellipse([width // 4, height // 3, width // 2, height // 2], fill=(250, 250, 20))
    return im


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL checkpoint (transformers 5.x key layout, one safetensors file)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0, arch="qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL checkpoint."""
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_vl"), seed=1, arch="qwen2_vl")


@pytest.fixture(scope="session")
def square_image() -> Image.Image:
    """224x224: 16x16 patches, 8x8 LM tokens, 2x2 vision windows of the tiny Qwen2.5-VL."""
    return draw_test_image(224, 224, seed=1)


@pytest.fixture(scope="session")
def tall_image() -> Image.Image:
    """140 wide x 308 high: a different size and aspect ratio, with partial edge windows."""
    return draw_test_image(140, 308, seed=2)


@pytest.fixture(scope="session")
def test_images(square_image, tall_image) -> list[Image.Image]:
    return [square_image, tall_image]
