"""Loader and registry: HF key layouts, shards, tied embeddings, parts, dummy weights, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.support.hf_reference import build_inputs, hf_logits, load_hf_model
from tools.tinyvlm.build import make_random_checkpoint
from workers.engine.attention import AttentionMetadata
from workers.models.loader import load_model
from workers.models.registry import UnsupportedArchitecture, resolve
from workers.models.qwen2_5_vl import Qwen2_5_VLModel
from workers.models.qwen2_vl import Qwen2VLModel
from workers.models.processing import ImageProcessor

# The published Qwen2.5-VL-7B-Instruct config.json (transformers 4.x form), fields that matter.
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "sliding_window": 32768,
    "use_sliding_window": False, "max_window_layers": 28, "torch_dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2},
}


@torch.no_grad()
def run_prefill(model, ids: list[int], positions: torch.Tensor) -> torch.Tensor:
    kv = torch.zeros(-(-len(ids) // 16), model.num_layers, 2, 16, model.num_kv_heads, model.head_dim)
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [list(range(kv.shape[0]))], 16)
    return model.compute_logits(model(torch.tensor(ids), positions, meta, kv))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def full_model(tiny_qwen_dir):
    return load_model(tiny_qwen_dir)


def test_registry_picks_class_from_architectures(tiny_qwen_dir, tiny_qwen2vl_dir):
    assert type(load_model(tiny_qwen_dir)) is Qwen2_5_VLModel
    assert type(load_model(tiny_qwen2vl_dir)) is Qwen2VLModel


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    class Cfg:
        architectures = ["LlamaForCausalLM"]
    with pytest.raises(UnsupportedArchitecture, match="'LlamaForCausalLM' is not supported; supported: "):
        resolve(Cfg())
    Cfg.architectures = []
    with pytest.raises(UnsupportedArchitecture, match="no 'architectures'"):
        resolve(Cfg())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("layout,sharded", [("v4", False), ("v5", True), ("v4", True)])
def test_layouts_and_shards_load_identical_weights(tmp_path, full_model, layout, sharded):
    path = make_random_checkpoint(tmp_path / "ckpt", seed=0, arch="qwen2_5_vl", key_layout=layout, sharded=sharded)
    assert (path / "model.safetensors.index.json").is_file() == sharded
    ours = load_model(path)
    assert_same_weights(ours, full_model)
    # HF's own class reads the same files to the same logits.
    inputs = build_inputs(path, "Hello, what do you see?")
    positions, _ = ours.mrope_positions(inputs.expanded_ids, [])
    got = run_prefill(ours, inputs.expanded_ids, positions)
    assert (got - hf_logits(load_hf_model(path), inputs)).abs().max().item() < 1e-4


def test_tied_embeddings_share_one_tensor(full_model, tiny_qwen_dir):
    assert full_model.tie_word_embeddings
    assert full_model.lm_head.weight.data_ptr() == full_model.language_model.embed_tokens.weight.data_ptr()
    with safe_open(str(tiny_qwen_dir / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied checkpoints omit the head


def split_vision_and_lm(src: Path, dst: Path) -> None:
    """Copy a checkpoint, storing vision and LM tensors in two shards, then corrupt the LM shard."""
    shutil.copytree(src, dst)
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (dst / "model.safetensors").unlink()
    vision = {k: v for k, v in tensors.items() if k.startswith("model.visual.")}
    lm = {k: v for k, v in tensors.items() if k not in vision}
    save_file(vision, str(dst / "vision.safetensors"))
    (dst / "lm.safetensors").write_bytes(b"\xff" * 64)  # unreadable: reading any LM tensor fails
    weight_map = {**{k: "vision.safetensors" for k in vision}, **{k: "lm.safetensors" for k in lm}}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_vision_part_loads_only_vision_and_embeds_like_full(tmp_path, tiny_qwen_dir, full_model, test_images):
    path = tmp_path / "split"
    split_vision_and_lm(tiny_qwen_dir, path)
    vision = load_model(path, parts=("vision",))
    assert vision.has_vision and not vision.has_lm
    assert all(n.startswith("visual.") for n, _ in vision.named_parameters())
    assert vision.hidden_size == full_model.hidden_size and vision.num_layers == full_model.num_layers
    pixel_values, grid = ImageProcessor(tiny_qwen_dir).process(test_images)
    with torch.no_grad():
        got, want = vision.encode_images(pixel_values, grid), full_model.encode_images(pixel_values, grid)
    assert [g.shape for g in got] == [w.shape for w in want] == [(64, 64), (55, 64)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(Exception):
        load_model(path, parts=("lm",))  # proves the LM shard really is unreadable


def test_lm_part_has_no_vision_weights(tiny_qwen_dir, full_model):
    lm = load_model(tiny_qwen_dir, parts=("lm",))
    assert lm.has_lm and not lm.has_vision
    assert not any(n.startswith("visual.") for n, _ in lm.named_parameters())
    full_lm = {k: v for k, v in state(full_model).items() if not k.startswith("visual.")}
    assert state(lm).keys() == full_lm.keys()
    assert all(torch.equal(state(lm)[k], full_lm[k]) for k in full_lm)
    with pytest.raises(RuntimeError, match="without the vision part"):
        lm.encode_images(torch.zeros(4, 1176), torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="non-empty subset"):
        load_model(tiny_qwen_dir, parts=("audio",))


def test_dummy_7b_config_has_the_real_parameter_count(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_VL_7B))
    model = load_model(tmp_path, device="meta", dtype=torch.bfloat16, load_format="dummy")
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 8.29e9) < 0.01e9, total
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(tmp_path))
    assert total == sum(p.numel() for p in hf.parameters())
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.hidden_size, model.vocab_size) \
        == (28, 4, 128, 3584, 152064)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.is_meta


def test_dummy_weights_need_no_checkpoint_files(tmp_path, tiny_qwen_dir, full_model):
    shutil.copy(tiny_qwen_dir / "config.json", tmp_path / "config.json")  # no weights at all
    model = load_model(tmp_path, load_format="dummy")
    assert state(model).keys() == state(full_model).keys()
    norm = model.language_model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    w = model.language_model.layers[0].self_attn.q_proj.weight
    assert 0.01 < w.std().item() < 0.03 and torch.isfinite(w).all()
    assert not torch.equal(w, full_model.language_model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_model(tmp_path)


def test_bad_checkpoints_give_clear_errors(tmp_path, tiny_qwen_dir):
    path = tmp_path / "bad"
    shutil.copytree(tiny_qwen_dir, path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.language_model.norm.weight"
    save_file({**tensors, key: torch.ones(3)}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"has shape \(3,\), the model expects \(64,\)"):
        load_model(path)
    save_file({k: v for k, v in tensors.items() if k != key}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="checkpoint lacks 1 tensors"):
        load_model(path)
    with pytest.raises(ValueError, match="load_format='fast'"):
        load_model(tiny_qwen_dir, load_format="fast")
