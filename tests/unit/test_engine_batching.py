"""Continuous batching: mixed requests together give the same tokens as alone; preemption under
memory pressure; abort at every stage frees every block; seeded sampling is reproducible."""

from __future__ import annotations

import pytest

from common.protocol import SamplingParams
from tests.support.hf_reference import chat_prompt_ids, load_tokenizer
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.offline import Prompt, generate

TEXTS = ["Hi.", "What colour is the sky on a clear day?", "Count from one to ten, slowly, please.",
         "Describe the picture.", "What is different between these?", "Name the shape.",
         "Say something nice about foxes, dogs and the weather today, in two sentences.", "Why?"]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(tiny_qwen_dir, square_image, tall_image) -> list[Prompt]:
    """8 requests: text only, one image, two images of different sizes, different lengths."""
    tok = load_tokenizer(tiny_qwen_dir)
    small = square_image.resize((112, 84))
    image_sets = [(), (), (square_image,), (small,), (tall_image, square_image), (), (small, tall_image), ()]
    return [Prompt(token_ids=tuple(chat_prompt_ids(tok, text, len(ims))), images=ims)
            for text, ims in zip(TEXTS, image_sets)]


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=128, max_num_batched_tokens=64))


@pytest.fixture(scope="module")
def alone(engine, prompts) -> list[list[int]]:
    """Each prompt run by itself (max_tokens 6..20, so requests finish at different steps)."""
    return [generate(engine, [p], greedy(6 + 2 * i))[0][0].token_ids for i, p in enumerate(prompts)]


def drain(engine: LLMEngine, outputs: dict[str, list[int]], steps: int | None = None) -> int:
    """Step (``steps`` times or to the end) collecting tokens; return the most requests running at once."""
    most = 0
    while engine.has_unfinished() and (steps is None or steps > 0):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        most = max(most, len(engine.scheduler.running))
        steps = None if steps is None else steps - 1
    return most


def add(engine: LLMEngine, i: int, p: Prompt, sampling: SamplingParams) -> None:
    engine.add_request(f"r{i}", list(p.token_ids), p.images, sampling)


def test_batched_equals_alone(engine, prompts, alone):
    outputs: dict[str, list[int]] = {}
    for i, p in enumerate(prompts[:5]):
        add(engine, i, p, greedy(6 + 2 * i))
    most = drain(engine, outputs, steps=3)  # then more arrive while the first ones decode
    for i, p in enumerate(prompts[5:], start=5):
        add(engine, i, p, greedy(6 + 2 * i))
    most = max(most, drain(engine, outputs))
    assert most >= 5
    assert [outputs[f"r{i}"] for i in range(8)] == alone
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_preemption_under_memory_pressure_keeps_tokens(tiny_qwen_dir, prompts, alone):
    # 10 blocks of 16 tokens cannot hold these requests at once: some are preempted and recomputed.
    tight = LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=10, max_num_batched_tokens=64))
    chosen = [0, 1, 2, 5, 7]
    outputs: dict[str, list[int]] = {}
    for i in chosen:
        add(tight, i, prompts[i], greedy(6 + 2 * i))
    drain(tight, outputs)
    assert tight.num_preemptions > 0
    assert [outputs[f"r{i}"] for i in chosen] == [alone[i] for i in chosen]
    assert tight.block_manager.num_free == 10


def test_abort_at_every_stage_returns_all_blocks(tiny_qwen_dir, prompts):
    eng = LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=32, max_num_batched_tokens=16,
                                 max_num_seqs=2))
    start = eng.block_manager.num_free
    for i in (4, 1, 2):
        add(eng, i, prompts[i], greedy(50))
    outputs: dict[str, list[int]] = {}
    drain(eng, outputs, steps=2)  # r4 (two images) is mid-prefill; r2 waits (max_num_seqs=2)
    r4 = eng.requests["r4"]
    assert 0 < r4.num_computed < r4.prompt_len and r4.block_ids
    assert eng.abort("r4") and eng.abort("r2")  # mid-prefill, waiting
    drain(eng, outputs, steps=4)
    assert len(outputs["r1"]) > 0  # r1 decodes
    assert eng.abort("r1")
    assert not eng.abort("r1") and not eng.abort("never-added")
    assert eng.block_manager.num_free == start and not eng.has_unfinished()
    assert eng.step() == []


def test_seeded_sampling_is_reproducible(engine, prompts):
    hot = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.95, seed=1234, ignore_eos=True)
    ref = generate(engine, [prompts[1]], hot)[0][0].token_ids
    others = [SamplingParams(max_tokens=9, temperature=1.0, ignore_eos=True),
              SamplingParams(max_tokens=14, temperature=0.8, top_k=20, seed=7, ignore_eos=True)]
    outputs: dict[str, list[int]] = {}
    add(engine, 0, prompts[2], others[0])
    add(engine, 1, prompts[1], hot)
    add(engine, 2, prompts[3], others[1])
    drain(engine, outputs)
    assert outputs["r1"] == ref
    other_seed = generate(engine, [prompts[1]], hot.model_copy(update={"seed": 99}))[0][0].token_ids
    assert other_seed != ref
