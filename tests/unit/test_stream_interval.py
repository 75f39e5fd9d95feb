"""The engine loop's stream interval: how many engine steps a stream's outputs are grouped over."""

from __future__ import annotations

import asyncio

import pytest

from common.protocol import SamplingParams, TokenDelta, decode
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine_loop import EngineLoop, add_engine_request, delivery_interval, stream_deltas


def test_auto_interval_grows_with_the_number_of_streams():
    assert [delivery_interval(0, n) for n in (0, 1, 32, 33, 64, 65, 96, 97, 128, 500)] == \
        [1, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert delivery_interval(1, 128) == 1 and delivery_interval(6, 1) == 6  # fixed: load ignored


def test_negative_interval_is_refused():
    async def make():
        EngineLoop(object(), stream_interval=-1)
    with pytest.raises(ValueError, match="stream_interval"):
        asyncio.run(make())


async def _run(engine: LLMEngine, request_id: str, interval: int, max_tokens: int) -> list[TokenDelta]:
    loop = EngineLoop(engine, name="engine-test", stream_interval=interval)
    loop.start()
    try:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        prompt_len, stream = await loop.add_request(request_id, add_engine_request, request_id,
                                                    (1, 2, 3, 4, 5), [], sampling, False)
        return [decode(c, TokenDelta) async for c in stream_deltas(loop, request_id, stream, prompt_len)]
    finally:
        await asyncio.to_thread(loop.stop)


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=32))


def test_outputs_are_grouped_every_n_steps_with_first_and_last_at_once(engine):
    every_step = asyncio.run(_run(engine, "one", 1, 10))
    grouped = asyncio.run(_run(engine, "three", 3, 10))
    tokens = [t for d in every_step for t in d.token_ids]
    assert len(tokens) == 10 and [t for d in grouped for t in d.token_ids] == tokens
    # The first token goes alone (time to first token is not delayed); then groups of 3 (a
    # consumer that falls behind may merge groups, never split them); the last one ends the stream.
    assert len(grouped[0].token_ids) == 1
    assert all(len(d.token_ids) >= 3 for d in grouped[1:])
    assert len(grouped) <= 4 < len(every_step)
    assert grouped[0].prompt_tokens == 5 and grouped[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in grouped[:-1])


def test_a_stream_shorter_than_the_interval_still_ends(engine):
    deltas = asyncio.run(_run(engine, "short", 8, 3))
    assert [len(d.token_ids) for d in deltas] == [1, 2]  # first alone; the last flushes the rest
    assert deltas[-1].finish_reason == "length"
