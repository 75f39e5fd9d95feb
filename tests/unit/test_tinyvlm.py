"""The tiny VLM tooling: random checkpoints load in transformers; the shipped model really sees."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from tools.tinyvlm import build, data

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "triad-tiny-vlm"


def _weight_keys(model_dir: Path) -> list[str]:
    keys = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys += list(st.keys())
    return keys


def _hf_logits(model_dir: Path, image: Image.Image) -> tuple[torch.Tensor, list[int]]:
    """Last-position logits of HF's model for one image + a question, inputs built as HF's
    processor builds them (placeholders expanded, mm_token_type_ids set)."""
    cfg = AutoConfig.from_pretrained(model_dir)
    model = build.model_class(cfg.model_type).from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = AutoImageProcessor.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    pix = proc([image], return_tensors="pt")
    n = int(pix["image_grid_thw"][0].prod()) // cfg.vision_config.spatial_merge_size ** 2
    expanded = [t for i in ids for t in ([i] * n if i == cfg.image_token_id else [i])]
    inp = torch.tensor([expanded])
    with torch.no_grad():
        out = model(input_ids=inp, pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"],
                    mm_token_type_ids=(inp == cfg.image_token_id).long())
    return out.logits[0, -1], ids


@pytest.fixture(scope="module")
def v5_dir(tmp_path_factory) -> Path:
    return build.make_random_checkpoint(tmp_path_factory.mktemp("v5"), seed=0)


def test_random_checkpoint_loads_and_runs(v5_dir: Path) -> None:
    cfg = json.loads((v5_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["vision_config"]["fullatt_block_indexes"] == [1]
    keys = _weight_keys(v5_dir)
    assert any(k.startswith("model.language_model.layers.") for k in keys)
    assert any(k.startswith("model.visual.blocks.") for k in keys)
    tok = AutoTokenizer.from_pretrained(v5_dir)
    for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id", "video_token_id"):
        assert cfg[name] < cfg["text_config"]["vocab_size"]
    assert tok.convert_ids_to_tokens(cfg["image_token_id"]) == "<|image_pad|>"
    assert tok.convert_ids_to_tokens(cfg["vision_start_token_id"]) == "<|vision_start|>"
    logits, ids = _hf_logits(v5_dir, Image.new("RGB", (224, 224), (200, 20, 20)))
    assert ids.count(cfg["image_token_id"]) == 1
    assert torch.isfinite(logits).all() and logits.std() > 0.1  # random logits are not all tied


def test_chat_template_one_placeholder_per_image(v5_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(v5_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare."},
                                          {"type": "image_url", "image_url": {"url": "data:,"}}]},
            {"role": "assistant", "content": "A red circle."},
            {"role": "user", "content": "Thanks!"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 2
    assert tok.decode(ids) == text


def test_image_processor_gives_several_windows(v5_dir: Path) -> None:
    proc = AutoImageProcessor.from_pretrained(v5_dir)
    grid = proc([Image.new("RGB", (224, 224))], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 16, 16]]  # 8x8 merged units; window 112 px = 4x4 units -> 4 windows
    cfg = json.loads((v5_dir / "config.json").read_text())["vision_config"]
    assert cfg["window_size"] // cfg["patch_size"] // cfg["spatial_merge_size"] < 8


def test_v4_sharded_layout_has_same_weights(v5_dir: Path, tmp_path: Path) -> None:
    v4 = build.make_random_checkpoint(tmp_path / "v4", seed=0, key_layout="v4", sharded=True)
    shards = sorted(p.name for p in v4.glob("*.safetensors"))
    assert len(shards) >= 2 and (v4 / "model.safetensors.index.json").exists()
    keys = _weight_keys(v4)
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("model.layers.") for k in keys)
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)
    img = Image.new("RGB", (200, 300), (20, 200, 20))
    assert torch.allclose(_hf_logits(v4, img)[0], _hf_logits(v5_dir, img)[0], atol=1e-5)


def test_qwen2_vl_checkpoint_loads(tmp_path: Path) -> None:
    d = build.make_random_checkpoint(tmp_path / "q2", seed=1, arch="qwen2_vl")
    assert json.loads((d / "config.json").read_text())["architectures"] == ["Qwen2VLForConditionalGeneration"]
    logits, _ = _hf_logits(d, Image.new("RGB", (128, 96), (0, 0, 200)))
    assert torch.isfinite(logits).all()


def test_seed_changes_weights(v5_dir: Path, tmp_path: Path) -> None:
    other = build.make_random_checkpoint(tmp_path / "s1", seed=1)
    with safe_open(str(v5_dir / "model.safetensors"), "pt") as a, \
            safe_open(str(other / "model.safetensors"), "pt") as b:
        key = "model.language_model.embed_tokens.weight"
        assert not torch.equal(a.get_tensor(key), b.get_tensor(key))
    assert (v5_dir / "tokenizer.json").read_text() == (other / "tokenizer.json").read_text()


# ---------------------------------------------------------------------------------------------
# The shipped tiny VLM (models/triad-tiny-vlm)


def test_shipped_model_dir_is_complete_and_small() -> None:
    names = {p.name for p in SHIPPED.iterdir()}
    for need in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "generation_config.json"):
        assert need in names, f"{need} missing from {SHIPPED}"
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 10 * 1024 * 1024
    cfg = json.loads((SHIPPED / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert not any("aux" in k for k in _weight_keys(SHIPPED))
    # one tokenizer for the trained model and every random checkpoint
    assert AutoTokenizer.from_pretrained(SHIPPED).get_vocab() == build.build_tokenizer().get_vocab()


def test_shipped_model_answers_fresh_images() -> None:
    from tools.tinyvlm import eval as tv_eval

    rng = random.Random(4242)  # a stream neither training nor eval.py uses
    samples = []
    for i, qtype in enumerate(("color", "shape", "describe", "color", "shape", "describe")):
        s = data.make_sample(rng, size=data.EVAL_SIZES[i % len(data.EVAL_SIZES)], qtype=qtype)
        samples.append(data.Sample(tv_eval.round_trip(rng, s.image), s.color, s.shape, s.qtype, s.question))
    answers = tv_eval.hf_answerer(SHIPPED)(samples)
    valid = {data.answer(t, c, sh) for t in data.QUESTION_TYPES for c in data.COLORS for sh in data.SHAPES}
    for a, s in zip(answers, samples):
        assert a in valid, f"{a!r} is not a well-formed answer"
        assert a == s.answer, (a, s.answer)


def test_triad_engine_answers_equal_transformers() -> None:
    """Greedy answers of Triad's own engine equal transformers' on freshly drawn images."""
    from tools.tinyvlm import eval as tv_eval

    samples = tv_eval.held_out_set(n_per_type=2, seed=777)
    hf = tv_eval.hf_answerer(SHIPPED)(samples)
    ours = tv_eval.triad_answerer(SHIPPED)(samples)
    assert ours == hf
    assert hf == [s.answer for s in samples]
