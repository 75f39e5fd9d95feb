"""The engine on CUDA: Triton attention + decode CUDA graphs give the reference's greedy tokens.

float32 on both sides (the Triton kernels then use exact fp32 products), so greedy tokens must be
identical; a bf16 run must agree with the float32 one on most tokens and stay finite.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from common.protocol import SamplingParams
from tests.support.hf_reference import chat_prompt_ids, load_tokenizer
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.offline import Prompt, generate

TEXTS = ["Hi.", "Describe the picture in detail, please.", "Count from one to ten.",
         "What is different between these two?", "Name the shape and its colour.", "Why?"]


def picture(w: int, h: int, seed: int) -> Image.Image:
    im = Image.new("RGB", (w, h), (seed * 40 % 256, 120, 200))
    d = ImageDraw.Draw(im)
    d.rectangle([w // 5, h // 4, w // 2, h // 2], fill=(240, 30 * seed % 256, 20))
    d.ellipse([w // 2, h // 2, w - 5, h - 5], fill=(10, 200, 90))
    return im


@pytest.fixture(scope="module")
def prompts(tiny_gpu_qwen_dir) -> list[Prompt]:
    tok = load_tokenizer(tiny_gpu_qwen_dir)
    images = [(), (picture(224, 224, 1),), (), (picture(140, 308, 2), picture(112, 84, 3)), (), ()]
    return [Prompt(token_ids=tuple(chat_prompt_ids(tok, t, len(ims))), images=ims)
            for t, ims in zip(TEXTS, images)]


def run(model_dir, prompts, dtype="float32", backend="triton", graphs=True, max_tokens=24,
        overlap=None, sampling=None):
    cfg = EngineConfig(model=str(model_dir), device="cuda", dtype=dtype, attention_backend=backend,
                       cuda_graphs=graphs, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=96,
                       overlap_decode=overlap)
    engine = LLMEngine(cfg)
    sampling = sampling or SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    results, _ = generate(engine, prompts, sampling)
    return engine, [r.token_ids for r in results]


def test_triton_with_graphs_equals_reference_eager(tiny_gpu_qwen_dir, prompts):
    ref_engine, ref = run(tiny_gpu_qwen_dir, prompts, backend="reference", graphs=False)
    assert ref_engine.runner.graphs is None
    engine, out = run(tiny_gpu_qwen_dir, prompts)
    graphs = engine.runner.graphs
    assert graphs is not None and sorted(graphs.graphs) == graphs.buckets == [1, 2, 4, 8, 16]
    assert graphs.num_replays >= 23  # every decode step of the last request ran as a graph
    assert out == ref
    assert engine.block_manager.num_free == 256


def test_graph_replay_equals_eager_triton(tiny_gpu_qwen_dir, prompts):
    """Padding a batch to its bucket changes nothing for the real rows."""
    _, eager = run(tiny_gpu_qwen_dir, prompts[:5], graphs=False)
    _, graphed = run(tiny_gpu_qwen_dir, prompts[:5], graphs=True)
    assert graphed == eager


def test_bf16_engine_is_close_to_float32(tiny_gpu_qwen_dir, prompts):
    _, fp32 = run(tiny_gpu_qwen_dir, prompts, max_tokens=8)
    _, bf16 = run(tiny_gpu_qwen_dir, prompts, dtype="bfloat16", max_tokens=8)
    first = [a[0] == b[0] for a, b in zip(fp32, bf16)]
    assert sum(first) >= len(prompts) - 1, (fp32, bf16)
    assert all(len(b) == 8 for b in bf16)


def test_bf16_logits_close_to_float32(tiny_gpu_qwen_dir, prompts):
    """Prefill logits of one prompt (image + text) in bf16 vs float32, relative error."""
    outs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = EngineConfig(model=str(tiny_gpu_qwen_dir), device="cuda", dtype=dtype,
                           attention_backend="triton", num_kv_blocks=64)
        engine = LLMEngine(cfg)
        engine.add_request("x", list(prompts[1].token_ids), prompts[1].images,
                           SamplingParams(max_tokens=1, temperature=0.0))
        chunks = engine.scheduler.schedule().chunks
        logits, _ = engine.runner.execute(chunks)
        outs[dtype] = logits.double()
    err = (outs["bfloat16"] - outs["float32"]).norm() / outs["float32"].norm()
    assert torch.isfinite(outs["bfloat16"]).all() and err < 5e-2


def test_overlapped_decode_equals_stepwise(tiny_gpu_qwen_dir, prompts):
    """Decode steps queued ahead (ids fed on the device) give the tokens of steps read one by one,
    greedy and seeded, in bf16 through the graphs."""
    for sampling in (SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
                     SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)):
        ahead, out = run(tiny_gpu_qwen_dir, prompts, dtype="bfloat16", sampling=sampling)
        plain, ref = run(tiny_gpu_qwen_dir, prompts, dtype="bfloat16", sampling=sampling, overlap=False)
        assert ahead.overlap_decode and not plain.overlap_decode
        assert ahead.num_overlapped >= 30 and plain.num_overlapped == 0
        assert ahead.runner.graphs.num_replays >= 30
        assert out == ref
        assert ahead.block_manager.num_free == 256
