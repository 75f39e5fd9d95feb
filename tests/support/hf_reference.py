"""Hugging Face transformers as the numerical reference in tests.

Builds prompts two ways from one chat: for our engine (one image placeholder per image) and for
HF (placeholders expanded to each image's token count, plus pixel_values, image_grid_thw and
``mm_token_type_ids``: without the latter HF silently falls back to 1-D positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The reference model (HF class picked by config.architectures), eval mode, no grad needed."""
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.eval()


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def chat_messages(text: str, num_images: int) -> list[dict]:
    """One user turn: the images first, then the text."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def chat_prompt_ids(tokenizer, text: str, num_images: int = 0) -> list[int]:
    """Token ids of the rendered chat template (generation prompt added), one placeholder per image."""
    rendered = tokenizer.apply_chat_template(chat_messages(text, num_images), tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class HFInputs:
    """Inputs for the HF model (batch of 1) and the pieces our engine needs for the same prompt."""

    prompt_ids: list[int]           # one placeholder per image (what our engine is given)
    expanded_ids: list[int]         # placeholders expanded (what both models actually run on)
    grid_thw: list[tuple[int, int, int]]
    pixel_values: torch.Tensor | None
    kwargs: dict                    # ready for hf_model(**kwargs)


def expand_placeholders(ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    if sum(1 for t in ids if t == image_token_id) != len(counts):
        raise ValueError("number of image placeholders does not match the number of images")
    it, out = iter(counts), []
    for t in ids:
        out.extend([t] * next(it) if t == image_token_id else [t])
    return out


def build_inputs(path: str | Path, text: str, images: list[Image.Image] = (), tokenizer=None,
                 image_processor=None) -> HFInputs:
    """Render a chat prompt with ``images`` and build HF's inputs as its processor would."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    tokenizer = tokenizer or load_tokenizer(path)
    prompt_ids = chat_prompt_ids(tokenizer, text, len(images))
    pixel_values, grids, counts = None, [], []
    if images:
        proc = image_processor or AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        out = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
        merge = config.vision_config.spatial_merge_size
        grids = [tuple(int(x) for x in g) for g in grid.tolist()]
        counts = [t * (h // merge) * (w // merge) for t, h, w in grids]
    expanded = expand_placeholders(prompt_ids, config.image_token_id, counts)
    ids = torch.tensor([expanded], dtype=torch.long)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == config.image_token_id).to(torch.int32)}
    if images:
        kwargs.update(pixel_values=pixel_values, image_grid_thw=torch.tensor(grids, dtype=torch.long))
    return HFInputs(prompt_ids, expanded, grids, pixel_values, kwargs)


@torch.no_grad()
def hf_logits(model, inputs: HFInputs) -> torch.Tensor:
    """Full-prompt logits [L, vocab] (float32) of the reference model."""
    return model(**inputs.kwargs, use_cache=False).logits[0].float()


@torch.no_grad()
def hf_image_embeds(model, inputs: HFInputs) -> torch.Tensor:
    """The reference vision tower + merger output for the prompt's images ([sum n_i, hidden])."""
    grid = inputs.kwargs["image_grid_thw"]
    out = model.model.get_image_features(inputs.pixel_values, grid)
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.cat(list(pooled), dim=0)
