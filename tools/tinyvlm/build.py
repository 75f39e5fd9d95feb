"""Build tiny Qwen2-VL / Qwen2.5-VL model directories that load offline in transformers.

``make_random_checkpoint`` writes a complete Hugging Face model dir with random weights (for tests
of the engine and the workers). The pieces it is made of (tokenizer, chat template, configs,
directory writer) are shared with ``tools.tinyvlm.train`` so the trained tiny VLM and every random
checkpoint use one tokenizer and one template.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from tools.tinyvlm import data

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)
TOKENIZER_VOCAB = 1024
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen-style template; rendered with trim_blocks, so every newline is written as {{ '\n' }}.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system{{ '\n' }}" + DEFAULT_SYSTEM + "<|im_end|>{{ '\n' }}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}{{ '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)

_GENERIC_ENGLISH = (
    "The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you.",
    "This is a small test model. It can see one shape and tell its color and its name.",
    "Please describe what you see in the picture in one short sentence.",
    "What is the weather like? It is sunny and warm, with a light wind from the west.",
    "One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9",
    "Yes. No. Maybe. I do not know. Thanks! Great question: the answer is below.",
)


@dataclass(frozen=True)
class TinySizes:
    """Model sizes of a tiny checkpoint (the LM and the vision tower)."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2 = 8
    rope_theta: float = 10000.0
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    fullatt_block_indexes: tuple[int, ...] = (1,)  # block 0 uses window attention
    patch_size: int = 14
    window_size: int = 112  # pixels: 4x4 merged units, so a 224x224 image spans 4 windows
    text_init_std: float = 0.1  # larger than HF's 0.02 so random logits are not all near-tied
    vision_init_std: float = 0.05

    def __post_init__(self) -> None:
        head_dim = self.hidden // self.heads
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must divide by heads and heads by kv_heads")
        if sum(self.mrope_section) * 2 != head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {head_dim // 2}")


@dataclass(frozen=True)
class ProcessorSizes:
    """Image processor limits: few vision tokens per image, but enough patches to see a shape."""

    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2


# ---------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_corpus() -> list[str]:
    """Text the BPE is trained on: rendered chat turns, the task's Q/A, a bit of English."""
    lines = list(_GENERIC_ENGLISH) + data.text_corpus()
    for q in data.text_corpus()[:40]:
        lines.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                     "<|im_start|>assistant\n")
    return lines * 4


def build_tokenizer():
    """A byte-level BPE (trained offline, deterministic) wrapped as a transformers fast tokenizer.

    Special tokens are appended after the learned vocabulary, as in Qwen's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, model_max_length=4096, padding_side="left",
        extra_special_tokens={}, clean_up_tokenization_spaces=False)


def special_ids(tokenizer) -> dict[str, int]:
    """Ids of the Qwen special tokens in ``tokenizer``."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


# ---------------------------------------------------------------------------------------------
# Configs


def _text_config(s: TinySizes, vocab: int, ids: dict[str, int]) -> dict:
    return {
        "vocab_size": vocab, "hidden_size": s.hidden, "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": s.rope_theta,
                            "mrope_section": list(s.mrope_section)},
        "initializer_range": s.text_init_std, "tie_word_embeddings": True,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"], "use_sliding_window": False,
    }


def _vision_config(s: TinySizes, arch: str) -> dict:
    common = {"depth": s.vision_depth, "num_heads": s.vision_heads, "patch_size": s.patch_size,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
              "initializer_range": s.vision_init_std}
    if arch == "qwen2_vl":
        return {**common, "embed_dim": s.vision_hidden, "hidden_size": s.hidden,
                "mlp_ratio": s.vision_intermediate // s.vision_hidden}
    return {**common, "hidden_size": s.vision_hidden, "intermediate_size": s.vision_intermediate,
            "out_hidden_size": s.hidden, "window_size": s.window_size, "tokens_per_second": 2,
            "fullatt_block_indexes": list(s.fullatt_block_indexes)}


def make_config(arch: str, tokenizer, sizes: TinySizes = TinySizes()):
    """A transformers config for a tiny ``arch`` ("qwen2_5_vl" | "qwen2_vl") matching ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = special_ids(tokenizer)
    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    cls = {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen2_vl": Qwen2VLConfig}.get(arch)
    if cls is None:
        raise ValueError(f"unknown arch {arch!r}; use 'qwen2_5_vl' or 'qwen2_vl'")
    return cls(
        text_config=_text_config(sizes, vocab, ids), vision_config=_vision_config(sizes, arch),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, dtype="float32")


def model_class(arch: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}[arch]


def make_image_processor(p: ProcessorSizes = ProcessorSizes()):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=p.min_pixels, max_pixels=p.max_pixels, patch_size=p.patch_size,
                                    merge_size=p.merge_size, temporal_patch_size=p.temporal_patch_size)


def make_generation_config(tokenizer):
    from transformers import GenerationConfig

    ids = special_ids(tokenizer)
    return GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=False)


# ---------------------------------------------------------------------------------------------
# Writing a model directory

KeyLayout = Literal["v5", "v4"]


def v4_key(key: str) -> str:
    """transformers 5.x weight name -> the 4.x name real Qwen2(.5)-VL checkpoints use."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    return key


def v5_key(key: str) -> str:
    """transformers 4.x weight name -> the 5.x module name (``model.language_model.X``,
    ``model.visual.X``). Names already in the 5.x form are returned unchanged."""
    if key.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("visual."):
        return "model." + key
    return key


def _write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, num_shards: int) -> None:
    """Split ``tensors`` into ``num_shards`` files plus model.safetensors.index.json (HF naming)."""
    keys = sorted(tensors)
    per = math.ceil(len(keys) / num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def rewrite_weights(out_dir: Path, key_layout: KeyLayout = "v5", sharded: bool = False,
                    drop_prefixes: tuple[str, ...] = ()) -> None:
    """Rewrite the model.safetensors that save_pretrained wrote: rename keys to ``key_layout``,
    drop keys under ``drop_prefixes``, and split into >= 2 shards when ``sharded``."""
    src = out_dir / "model.safetensors"
    rename = {"v4": v4_key, "v5": v5_key}.get(key_layout)
    if rename is None:
        raise ValueError(f"unknown key_layout {key_layout!r}; use 'v5' or 'v4'")
    # save_pretrained's own layout varies across transformers releases: normalise both ways.
    tensors = {rename(v5_key(k)): v for k, v in load_file(str(src)).items()}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(drop_prefixes)}
    if sharded:
        src.unlink()
        _write_shards(tensors, out_dir, num_shards=2)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(src), metadata={"format": "pt"})


def v4_config(cfg: dict) -> dict:
    """A transformers 5.x config.json dict -> the flat 4.x form real hub checkpoints have (text
    fields at top level, ``rope_scaling`` of type "mrope" and a top-level ``rope_theta``)."""
    cfg = dict(cfg)
    text = dict(cfg.pop("text_config"))
    text.pop("model_type", None)
    text.pop("layer_types", None)
    rope = dict(text.pop("rope_parameters"))
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    return {**text, **cfg}


def _finish_files(out_dir: Path, processor: ProcessorSizes, key_layout: KeyLayout) -> None:
    """Extras for readers other than transformers 5.23: the chat template inside
    tokenizer_config.json, min/max_pixels in the processor config, the 4.x config form for "v4"."""
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    proc_path = out_dir / "preprocessor_config.json"
    proc = json.loads(proc_path.read_text())
    proc.update(min_pixels=processor.min_pixels, max_pixels=processor.max_pixels)
    proc_path.write_text(json.dumps(proc, indent=2) + "\n")
    if key_layout == "v4":
        cfg_path = out_dir / "config.json"
        cfg_path.write_text(json.dumps(v4_config(json.loads(cfg_path.read_text())), indent=2) + "\n")
    for f in out_dir.iterdir():
        f.chmod(0o644)


def write_model_dir(model, tokenizer, out_dir: Path, processor: ProcessorSizes = ProcessorSizes(),
                    key_layout: KeyLayout = "v5", sharded: bool = False,
                    drop_prefixes: tuple[str, ...] = ()) -> Path:
    """Write a complete HF model dir: config, weights, tokenizer + chat template, processor and
    generation configs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.safetensors.index.json")):
        stale.unlink()
    model.generation_config = make_generation_config(tokenizer)
    model.save_pretrained(out_dir, max_shard_size="1GB")
    rewrite_weights(out_dir, key_layout, sharded, drop_prefixes)
    tokenizer.save_pretrained(out_dir)
    make_image_processor(processor).save_pretrained(out_dir)
    _finish_files(out_dir, processor, key_layout)
    return out_dir


def make_random_checkpoint(out_dir: str | Path, seed: int = 0, arch: str = "qwen2_5_vl",
                           key_layout: KeyLayout = "v5", sharded: bool = False) -> Path:
    """Write a tiny random ``arch`` ("qwen2_5_vl" | "qwen2_vl") model dir to ``out_dir`` and return it.

    Loads offline with the HF model classes, AutoTokenizer and AutoImageProcessor. ``key_layout``
    "v4" renames the weights to the transformers 4.x layout (``model.X``, ``visual.X``) that real
    checkpoints on the hub use; ``sharded`` writes 2 shards plus model.safetensors.index.json.
    The same seed gives the same weights."""
    tokenizer = build_tokenizer()
    config = make_config(arch, tokenizer)
    torch.manual_seed(seed)
    model = model_class(arch)(config).eval()
    return write_model_dir(model, tokenizer, Path(out_dir), key_layout=key_layout, sharded=sharded)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write a tiny random Qwen2(.5)-VL checkpoint")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen2_vl"])
    ap.add_argument("--key-layout", default="v5", choices=["v5", "v4"])
    ap.add_argument("--sharded", action="store_true")
    a = ap.parse_args()
    print(make_random_checkpoint(a.out_dir, a.seed, a.arch, a.key_layout, a.sharded))
