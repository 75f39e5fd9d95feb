"""Overlapped decode (EngineConfig.overlap_decode): the same tokens as stepping one at a time.

On a CPU nothing runs asynchronously, but the engine takes exactly the code path it takes on a
GPU: a decode step is queued with the previous step's sampled ids fed as a tensor, before the
host reads them. These tests force it on and compare every token with an engine that does not
overlap, across the cases where the overlap must stop or throw work away: requests that stop at
an unpredictable step, max_tokens, arrivals mid-decode, aborts while a step is queued,
preemption, seeded sampling, imported KV.
"""

from __future__ import annotations

import pytest
import torch

from common.protocol import SamplingParams
from tests.support.hf_reference import chat_prompt_ids, load_tokenizer
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.offline import Prompt

TEXTS = ["Hi.", "What colour is the sky on a clear day?", "Describe the picture.",
         "Count from one to ten, slowly, please.", "Name the shape.", "Why?"]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def make(tiny_qwen_dir, overlap: bool, **kw) -> LLMEngine:
    cfg = {"num_kv_blocks": 96, "max_num_batched_tokens": 64, **kw}
    return LLMEngine(EngineConfig(model=str(tiny_qwen_dir), overlap_decode=overlap, **cfg))


@pytest.fixture(scope="module")
def prompts(tiny_qwen_dir, square_image) -> list[Prompt]:
    tok = load_tokenizer(tiny_qwen_dir)
    images = [(), (), (square_image,), (), (square_image.resize((112, 84)),), ()]
    return [Prompt(token_ids=tuple(chat_prompt_ids(tok, t, len(ims))), images=ims)
            for t, ims in zip(TEXTS, images)]


@pytest.fixture(scope="module")
def plain(tiny_qwen_dir) -> LLMEngine:
    return make(tiny_qwen_dir, False)


@pytest.fixture(scope="module")
def ahead(tiny_qwen_dir) -> LLMEngine:
    return make(tiny_qwen_dir, True)


def run(engine: LLMEngine, requests: list[tuple[str, Prompt, SamplingParams]],
        arrivals: dict[int, list[tuple[str, Prompt, SamplingParams]]] | None = None,
        ) -> dict[str, tuple[list[int], str | None]]:
    """Add ``requests``, step to the end (adding ``arrivals[k]`` before step k); tokens and the
    finish reason per request."""
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    pending = dict(arrivals or {})

    def add(batch):
        for rid, p, s in batch:
            engine.add_request(rid, list(p.token_ids), p.images, s)
            tokens[rid] = []

    add(requests)
    k = 0
    while engine.has_unfinished() or pending:
        add(pending.pop(k, []))
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        k += 1
    return {rid: (tokens[rid], reasons.get(rid)) for rid in tokens}


def run_outputs(engine: LLMEngine) -> list:
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def test_overlap_is_off_on_cpu_unless_asked(tiny_qwen_dir, plain, ahead):
    auto = LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=8))
    assert not auto.overlap_decode and not plain.overlap_decode and ahead.overlap_decode


def test_same_tokens_with_stops_lengths_and_arrivals(plain, ahead, prompts):
    base = [(f"r{i}", p, greedy(5 + 3 * i)) for i, p in enumerate(prompts[:4])]
    ref = run(plain, base)
    # Stop r1 and r3 at a token they produce mid-way: a step the overlap cannot see coming.
    stops = {rid: toks[len(toks) // 2] for rid, (toks, _) in ref.items() if rid in ("r1", "r3")}
    reqs = [(rid, p, greedy(s.max_tokens, stop_token_ids=(stops[rid],)) if rid in stops else s)
            for rid, p, s in base]
    arrivals = {4: [("late4", prompts[4], greedy(9))], 9: [("late5", prompts[5], greedy(4))]}
    expected = run(plain, reqs, arrivals)
    assert {expected[r][1] for r in stops} == {"stop"} and expected["r0"][1] == "length"
    before = ahead.num_overlapped
    got = run(ahead, reqs, arrivals)
    assert got == expected
    assert ahead.num_overlapped > before
    assert ahead.block_manager.num_free == ahead.block_manager.num_blocks
    assert not ahead.in_flight and not ahead.requests


def test_steady_decode_queues_every_step_ahead(plain, ahead, prompts):
    reqs = [("s0", prompts[0], greedy(20)), ("s1", prompts[1], greedy(20))]
    assert sum(len(p.token_ids) for _, p, _ in reqs) <= 64  # one prefill step for both
    before = ahead.num_overlapped
    assert run(ahead, reqs) == run(plain, reqs)
    # Token 1 comes from the prefill, token 2 from a decode step scheduled as usual; each later
    # one from a step queued before the previous one was read: 18 for 20 tokens.
    assert ahead.num_overlapped - before == 18


def test_abort_while_a_step_is_queued_frees_blocks_after_it(ahead, plain, prompts):
    reqs = [("a", prompts[0], greedy(30)), ("b", prompts[1], greedy(12))]
    expected = run(plain, [reqs[1]])["b"]
    for rid, p, s in reqs:
        ahead.add_request(rid, list(p.token_ids), p.images, s)
    outs: dict[str, list[int]] = {"a": [], "b": []}
    while not (ahead.in_flight and len(outs["a"]) >= 2):
        for o in ahead.step():
            outs[o.request_id].extend(o.new_token_ids)
    held = len(ahead.requests["a"].block_ids)
    free = ahead.block_manager.num_free
    assert ahead.abort("a")
    # The queued step may still write a's KV: its blocks come back only once that step is read.
    assert ahead.block_manager.num_free == free
    for o in ahead.step():
        outs[o.request_id].extend(o.new_token_ids)
    assert ahead.block_manager.num_free >= free + held - 1  # b may have grown by one block
    while ahead.has_unfinished():
        for o in ahead.step():
            assert o.request_id == "b"
            outs["b"].extend(o.new_token_ids)
    assert outs["b"] == expected[0]
    assert ahead.block_manager.num_free == ahead.block_manager.num_blocks


def test_seeded_sampling_matches(plain, ahead, prompts):
    reqs = [("hot", prompts[1], SamplingParams(max_tokens=12, temperature=1.5, top_p=0.95, seed=1234,
                                               ignore_eos=True)),
            ("topk", prompts[3], SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=7,
                                                ignore_eos=True)),
            ("greedy", prompts[2], greedy(8))]
    assert run(ahead, reqs) == run(plain, reqs)


def test_preemption_under_memory_pressure(tiny_qwen_dir, plain, prompts):
    # 8 blocks of 16 tokens cannot hold all of these: some are preempted and recomputed.
    tight = make(tiny_qwen_dir, True, num_kv_blocks=8)
    reqs = [(f"t{i}", prompts[i], greedy(30)) for i in (0, 1, 3, 5)]
    got = run(tight, reqs)
    assert tight.num_preemptions > 0 and tight.num_overlapped > 0
    assert got == run(plain, reqs)
    assert tight.block_manager.num_free == 8


def test_imported_request_joins_a_running_decode(tiny_qwen_dir, plain, prompts):
    dec = make(tiny_qwen_dir, True, num_kv_blocks=40)
    pre = make(tiny_qwen_dir, False, num_kv_blocks=40)
    expected = run(plain, [("x", prompts[2], greedy(10)), ("y", prompts[1], greedy(10))])
    dec.add_request("y", list(prompts[1].token_ids), (), greedy(10))
    got = {"x": [], "y": []}
    while not dec.in_flight:
        for o in dec.step():
            got[o.request_id].extend(o.new_token_ids)
    pre.add_request("x", list(prompts[2].token_ids), prompts[2].images, greedy(10), prefill_only=True)
    [first] = [o for o in run_outputs(pre) if o.request_id == "x"]
    blocks = dec.reserve_import("x", first.kv.num_tokens)
    dec.kv_cache[torch.tensor(blocks)] = pre.kv_cache[torch.tensor(first.kv.block_ids)]
    dec.add_imported_request("x", first.prompt_tokens, first.new_token_ids[0], greedy(10), first.extras)
    got["x"].extend(first.new_token_ids)
    while dec.has_unfinished():
        for o in dec.step():
            got[o.request_id].extend(o.new_token_ids)
    assert got == {rid: toks for rid, (toks, _) in expected.items()}
    assert dec.block_manager.num_free == 40
