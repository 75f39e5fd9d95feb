"""Synthetic "one coloured shape" images and their questions/answers for the tiny VLM.

Every sample is one shape in one named colour (each drawn with a random shade) on a plain or
noisy background that contrasts with it, at a random size and position, in an image of random
size (square or not). Three question types with one consistent answer style:

  colour   "What color is the shape?"  -> "Red."
  shape    "What shape is this?"       -> "A circle."
  describe "Describe the image."       -> "A red circle."
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# name -> base RGB; each drawing jitters the shade around it (see `_shade`).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (35, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (240, 220, 30),
    "orange": (245, 135, 20),
    "purple": (135, 45, 175),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "pink": (245, 140, 190),
    "brown": (120, 70, 30),
    "gray": (128, 128, 128),
}
# Hexagons were tried and left out: at ~60 vision tokens a small one is hard to tell from a circle.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the shape?", "What colour is the shape?", "Which color is it?",
              "What color is this shape?"),
    "shape": ("What shape is this?", "What shape is in the image?", "Which shape is it?",
              "What is the shape?"),
    "describe": ("Describe the image.", "What is in the image?", "Describe the shape.",
                 "What do you see?"),
}
QUESTION_TYPES: tuple[str, ...] = tuple(QUESTIONS)
# Image sizes (w, h) of the held-out evaluation set; training never draws these.
EVAL_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (200, 300), (480, 640), (500, 500))


def answer(qtype: str, color: str, shape: str) -> str:
    """The one accepted answer for a question type (a short sentence)."""
    if qtype == "color":
        return f"{color.capitalize()}."
    if qtype == "shape":
        return f"A {shape}."
    if qtype == "describe":
        return f"{'An' if color[0] in 'aeiou' else 'A'} {color} {shape}."
    raise ValueError(f"unknown question type {qtype!r}; use one of {QUESTION_TYPES}")


@dataclass(frozen=True)
class Sample:
    """One drawn image with one question about it."""

    image: Image.Image
    color: str
    shape: str
    qtype: str
    question: str
    mask: Image.Image | None = None  # "L" image, 255 where the shape is (training's dense aux loss)

    @property
    def answer(self) -> str:
        return answer(self.qtype, self.color, self.shape)


def text_corpus() -> list[str]:
    """Every question and answer the task uses (fed to the tokenizer trainer)."""
    lines = [q for qs in QUESTIONS.values() for q in qs]
    for color in COLORS:
        for shape in SHAPES:
            lines += [answer(t, color, shape) for t in QUESTION_TYPES]
    return lines


# ---------------------------------------------------------------------------------------------
# Drawing


def _shade(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A natural variation of a named colour: scale brightness a little, jitter each channel."""
    scale = rng.uniform(0.85, 1.1)
    return tuple(max(0, min(255, int(c * scale + rng.uniform(-18, 18)))) for c in rgb)


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _contrasting_background(rng: random.Random, fg: tuple[int, int, int]) -> tuple[int, int, int]:
    """A background colour far enough from the shape's colour (in luma or hue) to see it."""
    for _ in range(100):
        bg = tuple(rng.randint(0, 255) for _ in range(3))
        dist = math.dist(bg, fg)
        if dist > 150 and abs(_luma(bg) - _luma(fg)) > 40:
            return bg
    return (255, 255, 255) if _luma(fg) < 128 else (0, 0, 0)


def _regular_polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        ang = -math.pi / 2 + math.pi * k / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    a = r * 0.33
    return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
            (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
            (cx - r, cy - a), (cx - a, cy - a)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               fill: tuple[int, int, int]) -> None:
    """Draw one upright shape of radius ``r`` centred at (cx, cy). No rotation, on purpose:
    a small vision tower learns shapes far faster when they are upright."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + r * 0.15, r, 3, -math.pi / 2), fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def _background(rng: random.Random, size: tuple[int, int], bg: tuple[int, int, int]) -> Image.Image:
    """A plain background, or (half the time) one with mild per-pixel noise."""
    img = Image.new("RGB", size, bg)
    if rng.random() < 0.5:
        noise = Image.effect_noise(size, rng.uniform(8, 25)).convert("RGB")
        img = Image.blend(img, Image.composite(noise, img, Image.new("L", size, 255)), 0.25)
    return img


def draw_image(rng: random.Random, color: str, shape: str,
               size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """One image of ``size`` (w, h) with one shape of the named colour on a contrasting
    background, and the shape's mask ("L", 255 inside)."""
    fg = _shade(rng, COLORS[color])
    img = _background(rng, size, _contrasting_background(rng, fg))
    w, h = size
    r = rng.uniform(0.2, 0.42) * min(w, h)
    cx = rng.uniform(r * 1.02, w - r * 1.02)
    cy = rng.uniform(r * 1.02, h - r * 1.02)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, fg)
    mask = Image.new("L", size, 0)
    draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, 255)
    return img, mask


def random_size(rng: random.Random, lo: int = 96, hi: int = 320, max_aspect: float = 1.8) -> tuple[int, int]:
    """A random image size; about a third are square, the rest at most ``max_aspect`` : 1 (very
    long thin images leave the shape only a few patches tall after resizing)."""
    w = rng.randint(lo, hi)
    if rng.random() < 0.33:
        return (w, w)
    h = rng.randint(max(lo, int(w / max_aspect)), min(hi, int(w * max_aspect)))
    return (w, h) if rng.random() < 0.5 else (h, w)


def make_sample(rng: random.Random, size: tuple[int, int] | None = None,
                qtype: str | None = None) -> Sample:
    """Draw one random sample (colour, shape, question type uniform)."""
    color = rng.choice(sorted(COLORS))
    shape = rng.choice(SHAPES)
    qtype = qtype or rng.choice(QUESTION_TYPES)
    image, mask = draw_image(rng, color, shape, size or random_size(rng))
    return Sample(image, color, shape, qtype, rng.choice(QUESTIONS[qtype]), mask)
