"""Disaggregation hooks: prefill-only + KV export, import into a second engine, decode.

The test copies the KV block tensors between the two engines itself (workers do it over UCX).
"""

from __future__ import annotations

import pytest
import torch

from common.protocol import KVLayout, SamplingParams
from tests.support.hf_reference import chat_prompt_ids, load_tokenizer
from workers.engine.block_manager import OutOfBlocks
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.offline import Prompt, generate

N_NEW = 24
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompt(tiny_qwen_dir, test_images) -> Prompt:
    ids = chat_prompt_ids(load_tokenizer(tiny_qwen_dir), "What differs between these pictures?", 2)
    return Prompt(token_ids=tuple(ids), images=tuple(test_images))


@pytest.fixture(scope="module")
def prefill_engine(tiny_qwen_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=48))


@pytest.fixture(scope="module")
def decode_engine(tiny_qwen_dir) -> LLMEngine:
    # Different size and block numbering than the prefill side: only the block ids map the KV.
    return LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=40))


def run_all(engine: LLMEngine) -> dict[str, list]:
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def prefill_only(engine: LLMEngine, rid: str, prompt: Prompt, sampling=GREEDY):
    engine.add_request(rid, list(prompt.token_ids), prompt.images, sampling, prefill_only=True)
    [out] = run_all(engine)[rid]
    return out


def transfer(src: LLMEngine, dst: LLMEngine, rid: str, out) -> None:
    """What the workers do over UCX: reserve blocks, copy the KV, continue decoding."""
    dst_blocks = dst.reserve_import(rid, out.kv.num_tokens)
    dst.kv_cache[torch.tensor(dst_blocks)] = src.kv_cache[torch.tensor(out.kv.block_ids)]
    dst.add_imported_request(rid, out.prompt_tokens, out.new_token_ids[0], GREEDY, out.extras)
    assert src.release(rid)


def test_prefill_export_import_decode_equals_uninterrupted(prefill_engine, decode_engine, prompt):
    [ref], _ = generate(decode_engine, [prompt], GREEDY)
    out = prefill_only(prefill_engine, "p1", prompt)
    assert out.finished and out.finish_reason is None and len(out.new_token_ids) == 1
    assert out.kv.num_tokens == out.prompt_tokens == ref.prompt_tokens
    assert len(out.kv.block_ids) == -(-out.prompt_tokens // 16)
    assert out.extras["rope_delta"] != 0  # images make the decode positions shift
    pinned_free = prefill_engine.block_manager.num_free
    assert pinned_free == 48 - len(out.kv.block_ids)  # pinned until released
    transfer(prefill_engine, decode_engine, "p1", out)
    assert prefill_engine.block_manager.num_free == 48
    decoded = [t for o in run_all(decode_engine)["p1"] for t in o.new_token_ids]
    assert out.new_token_ids + decoded == ref.token_ids
    assert decode_engine.block_manager.num_free == 40


def test_kv_layout_describes_the_cache(prefill_engine):
    layout = prefill_engine.kv_layout
    assert isinstance(layout, KVLayout)
    n, layers, two, block, heads, dim = prefill_engine.kv_cache.shape
    assert (layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim) == (
        layers, two, block, heads, dim)
    assert layout.dtype == "float32" and n == 48
    # Block-major: one block (all layers, K and V) is one contiguous region.
    assert prefill_engine.kv_cache[3].is_contiguous()


def test_prefill_only_that_ends_at_first_token_frees_blocks(prefill_engine, prompt):
    out = prefill_only(prefill_engine, "p2", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    assert out.finished and out.finish_reason == "length" and out.kv is None
    assert prefill_engine.block_manager.num_free == 48 and not prefill_engine.release("p2")


def test_imported_generated_image_token_batches_with_image_prefill(prefill_engine, decode_engine, prompt):
    """A generated image-token id is text: it must batch with another request's image prefill."""
    image_id = decode_engine.model.image_token_id
    out = prefill_only(prefill_engine, "p3", prompt)
    forced = type(out)(**{**out.__dict__, "new_token_ids": [image_id]})
    transfer(prefill_engine, decode_engine, "p3", forced)
    alone = [t for o in run_all(decode_engine)["p3"] for t in o.new_token_ids]
    out = prefill_only(prefill_engine, "p4", prompt)
    transfer(prefill_engine, decode_engine, "p4", type(out)(**{**out.__dict__, "new_token_ids": [image_id]}))
    decode_engine.add_request("other", list(prompt.token_ids), prompt.images, GREEDY)
    outs = run_all(decode_engine)
    assert [t for o in outs["p4"] for t in o.new_token_ids] == alone
    assert len(alone) == N_NEW - 1


def test_reserve_import_limits_and_abort(decode_engine, prefill_engine, prompt):
    with pytest.raises(ValueError, match="context holds 640"):
        decode_engine.reserve_import("huge", 10_000)
    blocks = decode_engine.reserve_import("r", 100)
    assert len(blocks) == 7 and decode_engine.block_manager.num_free == 33
    assert not decode_engine.can_reserve(34 * 16)
    with pytest.raises(OutOfBlocks, match="need 34 KV blocks, 33 of 40 free"):
        decode_engine.reserve_import("big", 34 * 16)
    with pytest.raises(ValueError, match="already in use"):
        decode_engine.reserve_import("r", 10)
    assert decode_engine.abort("r") and decode_engine.block_manager.num_free == 40
    with pytest.raises(ValueError, match="call reserve_import first"):
        decode_engine.add_imported_request("r", 100, 5, GREEDY)
    prefill_only(prefill_engine, "p5", prompt)
    assert prefill_engine.abort("p5") and prefill_engine.block_manager.num_free == 48


def test_imported_first_token_that_stops_ends_without_decoding(decode_engine):
    decode_engine.reserve_import("s", 30)
    decode_engine.add_imported_request("s", 30, 7, SamplingParams(max_tokens=8, stop_token_ids=(7,)), {})
    [out] = decode_engine.step()
    assert out.finished and out.finish_reason == "stop" and out.new_token_ids == []
    assert decode_engine.block_manager.num_free == 40
