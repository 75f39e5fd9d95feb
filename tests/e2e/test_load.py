"""A launched agg cluster under a burst of requests with large inline images (the H100 failure).

First 16 concurrent streaming requests (within the admission limit: none may be refused; the
streamed text and usage must match the non-streamed answers below). Then 48 concurrent chat requests, each with its own ~300 KB PNG as a ``data:`` URL inside the request
(NATS carries it: launch/common.sh's max_payload admits it, its max_pending keeps the burst), to a
worker that admits at most 16 at once (``--max-inflight 16``). Every request must either complete
correctly or get a clear 503 "overloaded" at once; the refused ones are retried until they
complete. Nothing may hang or lose a stream, and the worker stays up and serving.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests.e2e.launcher import TOPOLOGIES, Launch

REQUESTS = 48
MAX_INFLIGHT = 16
MAX_TOKENS = 8
IMAGE_SIDE = 320  # noise PNG of ~300 KB, ~400 KB as base64
DISTINCT = 4  # distinct images: the same image and question must give the same greedy text


def _noise_data_url(seed: int) -> str:
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (IMAGE_SIDE, IMAGE_SIDE), rng.randbytes(IMAGE_SIDE * IMAGE_SIDE * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(model: str, url: str) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


async def _until_done(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """POST until it completes; returns the response and the 503 messages seen on the way."""
    refusals: list[str] = []
    deadline = time.monotonic() + 45
    while True:
        resp = await client.post("/v1/chat/completions", json=body)
        if resp.status_code != 503 or time.monotonic() > deadline:
            assert resp.status_code == 200, resp.text
            return resp.json(), refusals
        refusals.append(resp.json()["error"]["message"])
        await asyncio.sleep(0.2 + random.random() * 0.3)


async def _stream_one(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One SSE completion: (text, usage); any error status fails the test."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    text, usage = "", {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
            for choice in chunk.get("choices", []):
                text += choice["delta"].get("content") or ""
            usage = chunk.get("usage") or usage
    return text, usage


async def _streams(base_url: str, model: str, urls: list[str]) -> list[tuple[str, dict[str, Any]]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(50.0)) as client:
        return list(await asyncio.gather(*(_stream_one(client, _body(model, urls[i % DISTINCT]))
                                           for i in range(MAX_INFLIGHT))))


async def _burst(base_url: str, model: str, urls: list[str]) -> list[tuple[dict[str, Any], list[str], float]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(50.0)) as client:
        async def one(i: int) -> tuple[dict[str, Any], list[str], float]:
            t0 = time.monotonic()
            out, refusals = await _until_done(client, _body(model, urls[i % DISTINCT]))
            return out, refusals, time.monotonic() - t0
        return list(await asyncio.gather(*(one(i) for i in range(REQUESTS))))


def test_burst_of_large_inline_images(model_dir: str, tmp_path: Path) -> None:
    urls = [_noise_data_url(seed) for seed in range(DISTINCT)]
    assert all(250_000 < len(u) < 1_000_000 for u in urls)
    launch = Launch(TOPOLOGIES["agg"], model_dir, tmp_path / "run",
                    worker_args=f"--kv-cache-mb 128 --max-inflight {MAX_INFLIGHT} --drain-timeout-s 10",
                    extra_env={"OMP_NUM_THREADS": "1"})
    launch.start(timeout=180)
    try:
        model = Path(model_dir).name
        streamed = asyncio.run(_streams(launch.base_url, model, urls))
        t0 = time.monotonic()
        results = asyncio.run(_burst(launch.base_url, model, urls))
        elapsed = time.monotonic() - t0
        worker_alive = os.path.exists(f"/proc/{launch.pids()['agg-0']}")
        health = launch.health()
    finally:
        leftovers = launch.stop()
    worker_log = launch.log("agg-0")
    assert not leftovers, leftovers
    assert not launch.unclean_workers(), worker_log[-3000:]
    assert elapsed < 60, f"the burst took {elapsed:.1f} s"
    texts: dict[int, set[str]] = {}
    for i, (out, refusals, _) in enumerate(results):
        choice = out["choices"][0]
        assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == MAX_TOKENS
        assert out["usage"]["prompt_tokens"] > 50  # the image's tokens are in the prompt
        texts.setdefault(i % DISTINCT, set()).add(choice["message"]["content"])
        for message in refusals:  # a refusal says what happened and what to do
            assert "overloaded" in message and "retry" in message, message
    assert all(len(t) == 1 for t in texts.values()), texts  # same request, same greedy text
    for i, (text, usage) in enumerate(streamed):  # streamed (several tokens per delta or not) == whole
        assert {text} == texts[i % DISTINCT] and usage["completion_tokens"] == MAX_TOKENS, (text, usage)
    refused = sum(len(r) for _, r, _ in results)
    print(f"{REQUESTS} requests in {elapsed:.1f} s, {refused} refusals (503) retried")
    assert refused > 0, "admission control never refused: the burst did not exceed --max-inflight"
    assert worker_alive and health.get("agg") == 1  # the worker came through the burst
    assert "Traceback" not in worker_log and "slow consumer" not in worker_log.lower()


async def _deltas(engine: Any, request_id: str, sampling: Any, stall_s: float) -> list[Any]:
    """Run one request through a real EngineLoop; the consumer stalls ``stall_s`` after the first
    delta (as a worker's event loop does under load) and then reads the rest."""
    from common.protocol import TokenDelta, decode
    from workers.engine_loop import EngineLoop, add_engine_request, stream_deltas

    loop = EngineLoop(engine, name="engine-test")
    loop.start()
    try:
        prompt_len, stream = await loop.add_request(request_id, add_engine_request, request_id,
                                                    (1, 2, 3, 4, 5), [], sampling, False)
        deltas = []
        async for chunk in stream_deltas(loop, request_id, stream, prompt_len):
            deltas.append(decode(chunk, TokenDelta))
            if len(deltas) == 1:
                await asyncio.sleep(stall_s)  # blocks nothing but this consumer
        return deltas
    finally:
        await asyncio.to_thread(loop.stop)


def test_a_consumer_that_falls_behind_gets_tokens_coalesced(offline_engine: Any) -> None:
    """Outputs queued while the consumer was busy go out as one TokenDelta with several token ids;
    the tokens, prompt_tokens and finish_reason are the same as when every token goes alone."""
    from common.protocol import SamplingParams

    sampling = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = asyncio.run(_deltas(offline_engine, "alone", sampling, 0.0))
    stalled = asyncio.run(_deltas(offline_engine, "stalled", sampling, 1.0))
    tokens = [t for d in alone for t in d.token_ids]
    assert len(tokens) == 24 and [t for d in stalled for t in d.token_ids] == tokens
    assert len(stalled) < len(alone) and max(len(d.token_ids) for d in stalled) > 1
    for deltas in (alone, stalled):
        assert deltas[0].prompt_tokens == 5 and all(d.prompt_tokens is None for d in deltas[1:])
        assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
