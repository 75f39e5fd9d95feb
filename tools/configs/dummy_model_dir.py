"""A model directory for ``--load-format dummy``: a real config, the project's tiny tokenizer, no weights.

Benchmarks of full-size shapes (e.g. ``tools/configs/qwen2_5_vl_7b.json``) need a directory the
whole serving path accepts: the worker reads ``config.json``, ``preprocessor_config.json`` and
``generation_config.json``; the frontend and the bench client read ``tokenizer.json`` and the chat
template. No hub is reachable, so the tokenizer is the tiny byte-level BPE of ``tools.tinyvlm``:

1. the config's special token ids (image, video, vision start/end, bos/eos) are set to the tiny
   tokenizer's ids, so prompts the frontend builds carry placeholders the model recognises;
2. the tokenizer's vocabulary is padded up to the config's ``vocab_size`` with filler tokens
   ``" t<id>"`` (vocabulary entries with no merges: never produced by encoding, but every id a
   random-weight model samples decodes to visible text, so streaming and TTFT are measured on real
   text chunks rather than on empty ones);
3. the image processor is Qwen2-VL's with the real patching (patch 14, merge 2 from the config's
   vision part) and Qwen2.5-VL's pixel limits, so a 512x512 image gives grid (1, 36, 36) = 324 tokens.

    python -m tools.configs.dummy_model_dir tools/configs/qwen2_5_vl_7b.json OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from tools.tinyvlm.build import CHAT_TEMPLATE, build_tokenizer

# Qwen2.5-VL's own preprocessor limits (56x56 .. 3584x3584) and its normalisation (CLIP's).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
_CONFIG_IDS = {  # config key -> tiny tokenizer token
    "bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>",
    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
}  # vision_token_id (Qwen's <|vision_pad|>) has no tiny counterpart and is unused: left as is


def pad_vocab(tokenizer_json: dict[str, Any], vocab_size: int) -> int:
    """Give every id below ``vocab_size`` a token; returns how many filler tokens were added."""
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    # On load, `tokenizers` numbers added tokens that are missing from the model's vocab after
    # it (len(vocab) + k): put them into the vocab at their ids so they keep those ids.
    for tok in tokenizer_json.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
    taken = set(vocab.values())
    added = 0
    for i in range(vocab_size):
        if i not in taken:
            vocab[f"\u0120t{i}"] = i  # "\u0120" is byte-level BPE's space: decodes to " t<i>"
            added += 1
    return added


def write_tokenizer(out: Path, vocab_size: int) -> dict[str, int]:
    """tokenizer.json (padded), tokenizer_config.json and chat_template.jinja; the special ids."""
    fast = build_tokenizer()
    tok = fast.backend_tokenizer
    ids = {t: tok.token_to_id(t) for t in set(_CONFIG_IDS.values())}
    data = json.loads(tok.to_str())
    if vocab_size < len(fast):
        raise ValueError(f"config vocab_size {vocab_size} is below the tokenizer's {len(fast)} tokens")
    pad_vocab(data, vocab_size)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "model_max_length": 131072, "padding_side": "left",
               "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return ids


def patch_config(cfg: dict[str, Any], ids: dict[str, int]) -> dict[str, Any]:
    """The config with its special token ids (top level and text_config) set to the tokenizer's."""
    cfg = json.loads(json.dumps(cfg))
    for section in (cfg, cfg.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key, token in _CONFIG_IDS.items():
            if key in section or section is cfg:
                section[key] = ids[token]
    return cfg


def vocab_size_of(cfg: dict[str, Any]) -> int:
    size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not size:
        raise ValueError("the config has no vocab_size (top level or text_config)")
    return int(size)


def preprocessor_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-VL image processor settings with the config's patching."""
    vision = cfg.get("vision_config") or {}
    patch = int(vision.get("patch_size", 14))
    merge = int(vision.get("spatial_merge_size", 2))
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
            "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
            "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
            "patch_size": patch, "merge_size": merge,
            "temporal_patch_size": int(vision.get("temporal_patch_size", 2))}


def make_dummy_model_dir(config_path: str | Path, out_dir: str | Path) -> Path:
    """Write the model dir (see the module docstring) and return it. No weights are written."""
    cfg = json.loads(Path(config_path).read_text())
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ids = write_tokenizer(out, vocab_size_of(cfg))
    cfg = patch_config(cfg, ids)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(cfg), indent=2) + "\n")
    gen = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
           "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="a config.json, e.g. tools/configs/qwen2_5_vl_7b.json")
    ap.add_argument("out_dir", help="the model directory to write (replaced if it exists)")
    a = ap.parse_args(argv)
    print(make_dummy_model_dir(a.config, a.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
