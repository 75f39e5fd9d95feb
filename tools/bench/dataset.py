"""Synthetic benchmark requests: seeded random images and prompts of an exact token length.

Every request gets its own images and its own text (derived from one seed and the request's
index), so neither an embedding cache nor a prefix cache can make a later request cheaper.
"""

from __future__ import annotations

import base64
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_WORD = re.compile(r"^ [A-Za-z]+$")


def parse_size(text: str) -> tuple[int, int]:
    """``"512x384"`` -> (width 512, height 384)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"image size {text!r} must look like WIDTHxHEIGHT, e.g. 512x512")
    return int(match[1]), int(match[2])


def draw_image(rng: random.Random, width: int, height: int) -> Image.Image:
    """Low-amplitude noise over a random background colour, with a few random shapes on top."""
    base = np.array([rng.randrange(256) for _ in range(3)], dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-24, 25, (height, width, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(1, max(1, width // 2)), y0 + rng.randint(1, max(1, height // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x1, y1], fill=colour)
    return img


def data_url(img: Image.Image, fmt: str = "png") -> str:
    """A base64 ``data:`` URL of ``img`` encoded as PNG or JPEG."""
    fmt = fmt.lower()
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"image format {fmt!r} must be 'png' or 'jpeg'")
    buf = io.BytesIO()
    img.save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode()


class ExactPrompter:
    """Builds text that the model's tokenizer turns into exactly ``n`` tokens.

    Fast path: concatenate " word" pieces that are each a single token (byte-level BPE splits text
    at every space before a word, so each piece stays one token). Otherwise: decode random token
    ids, re-encode, fix up the length and repeat until it is exact."""

    def __init__(self, tokenizer_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{path} does not exist; pass --tokenizer DIR, a model directory that "
                             "holds the served model's tokenizer.json")
        self.tok = Tokenizer.from_file(str(path))
        special = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        vocab = self.tok.get_vocab()
        self._plain = sorted(i for t, i in vocab.items() if t not in special)
        self._words = [w for w in (self.tok.decode([i]) for i in self._plain) if self._is_word(w)]

    def _is_word(self, piece: str) -> bool:
        return bool(_WORD.match(piece)) and len(self.count(piece)) == 1

    def count(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def make(self, n: int, rng: random.Random) -> str:
        """Text of exactly ``n`` tokens (raises RuntimeError if that cannot be reached)."""
        if n < 0:
            raise ValueError(f"input tokens must be >= 0, got {n}")
        if n == 0:
            return ""
        if len(self._words) >= 16:
            text = "".join(rng.choices(self._words, k=n))
            if len(self.count(text)) == n:
                return text
        return self._fix_up(n, rng)

    def _fix_up(self, n: int, rng: random.Random, tries: int = 50) -> str:
        ids = rng.choices(self._plain, k=n)
        for _ in range(tries):
            text = self.tok.decode(ids)
            got = self.count(text)
            if len(got) == n:
                return text
            ids = got[:n] if len(got) > n else got + rng.choices(self._plain, k=n - len(got))
        raise RuntimeError(f"could not build a prompt of exactly {n} tokens with this tokenizer")


@dataclass(frozen=True)
class RequestShape:
    """What every synthetic request looks like."""

    images_per_request: int = 1
    image_size: tuple[int, int] = (512, 512)
    image_format: str = "png"
    input_tokens: int = 1000
    output_tokens: int = 1000
    temperature: float = 0.0


def make_payload(model: str, shape: RequestShape, prompter: ExactPrompter, seed: int,
                 index: int) -> dict[str, Any]:
    """The chat-completions body of synthetic request ``index`` (streamed, with usage)."""
    rng = random.Random(f"{seed}:{index}")
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_url(draw_image(rng, *shape.image_size),
                                                             shape.image_format)}}
        for _ in range(shape.images_per_request)]
    parts.append({"type": "text", "text": prompter.make(shape.input_tokens, rng)})
    return {"model": model, "messages": [{"role": "user", "content": parts}],
            "max_tokens": shape.output_tokens, "ignore_eos": True, "temperature": shape.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
