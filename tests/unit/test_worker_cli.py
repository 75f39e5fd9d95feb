"""The worker's command line: engine-config flags, their defaults by device, and a dummy-weights
model dir served end to end through launch/agg.sh (real etcd, NATS, frontend, HTTP) on CPU."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image
from tokenizers import Tokenizer

from tests.e2e.launcher import TOPOLOGIES, Launch
from tools.configs.dummy_model_dir import make_dummy_model_dir
from tools.tinyvlm.build import build_tokenizer, make_config
from workers.__main__ import build_parser, configs
from workers.base import WorkerConfig
from workers.models.processing import ImageProcessor


def _worker(model: Path, *flags: str) -> WorkerConfig:
    args = build_parser().parse_args(["--role", "agg", "--model", str(model), *flags])
    return configs(args)[0]


@pytest.fixture(scope="module")
def dummy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-VL config turned into a weightless model dir by the benchmark recipe."""
    src = tmp_path_factory.mktemp("tiny_cfg") / "config.json"
    cfg = make_config("qwen2_5_vl", build_tokenizer()).to_dict()
    cfg["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    src.write_text(json.dumps(cfg))
    return make_dummy_model_dir(src, tmp_path_factory.mktemp("dummy") / "tiny-dummy")


def test_engine_flags_default_on(tmp_path: Path) -> None:
    eng = _worker(tmp_path).engine_config()
    assert (eng.cuda_graphs, eng.compile_lm, eng.compile_vision) == (True, True, True)
    assert eng.attention_backend == "reference"  # auto on CPU


def test_no_flags_reach_the_engine_config(tmp_path: Path) -> None:
    eng = _worker(tmp_path, "--no-cuda-graphs", "--no-compile").engine_config()
    assert (eng.cuda_graphs, eng.compile_lm, eng.compile_vision) == (False, False, False)
    eng = _worker(tmp_path, "--no-compile-vision").engine_config()
    assert (eng.cuda_graphs, eng.compile_lm, eng.compile_vision) == (True, True, False)
    # --compile sets both parts and wins over the per-part flags
    eng = _worker(tmp_path, "--no-compile-lm", "--compile").engine_config()
    assert (eng.compile_lm, eng.compile_vision) == (True, True)


def test_attention_backend_follows_the_device(tmp_path: Path) -> None:
    assert _worker(tmp_path, "--device", "cuda").attention_backend == "triton"
    assert _worker(tmp_path, "--device", "cuda:1").engine_config().attention_backend == "triton"
    assert _worker(tmp_path, "--device", "cpu").attention_backend == "reference"
    explicit = _worker(tmp_path, "--device", "cuda", "--attention-backend", "reference")
    assert explicit.engine_config().attention_backend == "reference"


def test_load_format_dummy_flag(tmp_path: Path) -> None:
    assert _worker(tmp_path, "--load-format", "dummy").engine_config().load_format == "dummy"
    with pytest.raises(ValueError, match="load_format"):
        _worker(tmp_path, "--load-format", "nonsense").engine_config()


def test_dummy_model_dir_ids_tokens_and_patching(dummy_dir: Path) -> None:
    cfg = json.loads((dummy_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(dummy_dir / "tokenizer.json"))
    assert cfg["image_token_id"] == tok.token_to_id("<|image_pad|>")
    assert cfg["vision_start_token_id"] == tok.token_to_id("<|vision_start|>")
    assert cfg["eos_token_id"] == tok.token_to_id("<|im_end|>")
    vocab = cfg["text_config"]["vocab_size"]
    assert tok.get_vocab_size() == vocab
    specials = {tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                             "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                             "<|video_pad|>")}
    # every id a random model may sample decodes to visible text
    assert all(tok.decode([i]) for i in range(vocab) if i not in specials)
    assert tok.decode([vocab - 1]) == f" t{vocab - 1}"  # a filler token past the learned ones
    assert not list((dummy_dir).glob("*.safetensors"))
    _, grid = ImageProcessor(dummy_dir).process([Image.new("RGB", (512, 512), "red")])
    assert grid.tolist() == [[1, 36, 36]]  # the real Qwen2.5-VL patching: 324 LM tokens


def _ucxx_blocker(root: Path) -> Path:
    """A package named ucxx that refuses import, first on PYTHONPATH: the GPU machine has no ucxx,
    and the agg path must never need it."""
    pkg = root / "ucxx"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('ucxx imported on the agg path')\n")
    return root


def _chat(base_url: str, model: str) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), "blue").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": model, "max_tokens": 8, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is this?"}]}]}
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.slow
def test_agg_serves_dummy_weights_without_ucxx(dummy_dir: Path, tmp_path: Path) -> None:
    blocker = _ucxx_blocker(tmp_path / "block")
    launch = Launch(TOPOLOGIES["agg"], str(dummy_dir), tmp_path / "run",
                    worker_args="--load-format dummy --kv-cache-mb 32 --no-compile --no-cuda-graphs",
                    extra_env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(blocker)})
    launch.start(timeout=180)
    try:
        out = _chat(launch.base_url, dummy_dir.name)
        logs = launch.log("agg-0") + launch.log("frontend")
    finally:
        leftovers = launch.stop()
    assert not leftovers, f"processes left running after SIGTERM: {leftovers}"
    assert out["usage"]["completion_tokens"] == 8
    assert out["choices"][0]["message"]["content"]  # every sampled id decodes to some text
    assert "ucxx" not in logs  # nothing tried (and caught) an import of the blocked package
