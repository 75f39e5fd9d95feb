"""The frontend's orchestration over real etcd, NATS and HTTP, against scripted workers.

The scripted workers speak the real wire protocol on real NATS subjects and register real etcd
records; they replace the model only, so failure cases a real worker cannot be made to produce on
demand (a hang, an instance that vanished, a 4xx at a chosen hop) are reproducible. What each one
receives is recorded so the tests can check the messages the frontend sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from common import protocol as P
from common.messaging import RemoteError, StreamContext
from frontend.preprocess import ChatTokenizer
from test_frontend_http import MODEL, Env, card, chat, env, error_of, planes  # noqa: F401 (fixtures)

REPLY = "A red circle, naïve 🎉 STOP here."
IMG = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


@dataclass
class Script:
    """How a scripted worker behaves, and what it saw."""

    tokens: list[int]
    error: tuple[int, str] | None = None  # answer every request with this ErrorReply
    hang: bool = False  # never answer
    token_delay_s: float = 0.0
    received: list = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    stream_cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class ScriptedWorker:
    def __init__(self, env: Env, role: P.Role, script: Script, serve: bool = True) -> None:
        self.env, self.role, self.s, self.serve = env, role, script, serve
        self.services: list = []

    async def start(self) -> "ScriptedWorker":
        self.rec, self.reg = await self.env.add_instance(self.role)
        if not self.serve:  # registered, but nobody answers its subject (it just died)
            return self
        m, sub = self.env.m, lambda ep: P.instance_subject(self.rec.subject, ep)
        unary = {P.Role.ENCODE: ("encode", self._encode), P.Role.PREFILL: ("prefill", self._prefill)}
        stream = {P.Role.DECODE: ("decode", self._decode), P.Role.AGG: ("generate", self._generate)}
        if self.role in unary:
            ep, fn = unary[self.role]
            self.services.append(await m.serve_unary(sub(ep), fn))
        else:
            ep, fn = stream[self.role]
            self.services.append(await m.serve_stream(sub(ep), fn))
        self.services.append(await m.serve_unary(sub("cancel"), self._cancel))
        return self

    async def stop(self) -> None:
        for svc in self.services:
            await svc.stop()
        await self.reg.deregister()

    async def _gate(self, msg: object) -> None:
        self.s.received.append(msg)
        if self.s.error:
            raise RemoteError(self.s.error[0], "scripted_error", self.s.error[1])
        if self.s.hang:
            await asyncio.sleep(3600)

    async def _cancel(self, data: bytes) -> bytes:
        self.s.cancels.append(P.decode(data, P.CancelRequest).request_id)
        return P.encode(P.Ack())

    async def _encode(self, data: bytes) -> bytes:
        req = P.decode(data, P.EncodeRequest)
        await self._gate(req)
        owner = P.TransferAddress(instance_id=self.rec.instance_id, ucx_address="")
        handle = P.EmbeddingHandle(owner=owner, key=req.request_id, shape=(4, 64), dtype="float32", num_tokens=4,
                                   extras={"grid_thw": [1, 4, 4]}, content_hash=req.media.url)
        return P.encode(P.EncodeResponse(request_id=req.request_id, handle=handle))

    async def _prefill(self, data: bytes) -> bytes:
        req = P.decode(data, P.PrefillRequest)
        await self._gate(req)
        expanded = len(req.token_ids) + sum((i.handle.num_tokens - 1) if i.handle else 9 for i in req.images)
        layout = P.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=16, dtype="float32")
        kv = P.KVHandle(owner=P.TransferAddress(instance_id=self.rec.instance_id, ucx_address=""), key="kv",
                        block_ids=(0,), num_tokens=expanded, layout=layout)
        return P.encode(P.PrefillResponse(request_id=req.request_id, first_token=self.s.tokens[0],
                                          prompt_tokens=expanded, kv=kv, extras={"rope_delta": -3}))

    async def _tokens(self, req: object, tokens: list[int], prompt_tokens: int,
                      ctx: StreamContext) -> AsyncIterator[bytes]:
        limit = req.sampling.max_tokens
        try:
            for i, tok in enumerate(tokens[:limit]):
                await asyncio.sleep(self.s.token_delay_s)
                done = i == len(tokens[:limit]) - 1
                reason = ("length" if limit < len(tokens) else "stop") if done else None
                yield P.encode(P.TokenDelta(request_id=req.request_id, token_ids=(tok,), finish_reason=reason,
                                            prompt_tokens=prompt_tokens if i == 0 else None))
        except asyncio.CancelledError:
            self.s.stream_cancelled.set()
            raise

    async def _generate(self, data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
        req = P.decode(data, P.GenerateRequest)
        await self._gate(req)
        async for chunk in self._tokens(req, self.s.tokens, len(req.token_ids) + 9 * len(req.images), ctx):
            yield chunk

    async def _decode(self, data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
        req = P.decode(data, P.DecodeRequest)
        await self._gate(req)
        # Like the real decode worker: the first delta repeats the prefill's first token.
        async for chunk in self._tokens(req, [req.first_token] + self.s.tokens[1:], req.prompt_tokens, ctx):
            yield chunk


@pytest.fixture(scope="module")
def reply_tokens(tiny_qwen_dir: Path) -> list[int]:
    tok = ChatTokenizer(tiny_qwen_dir)
    return tok.encode(REPLY) + tok.encode("<|im_end|>")


async def start_workers(env: Env, roles: dict[P.Role, int], tokens: list[int], **script: object):
    scripts = {role: Script(list(tokens), **script) for role in roles}
    workers = [await ScriptedWorker(env, role, scripts[role]).start() for role, n in roles.items() for _ in range(n)]
    await env.wait_servable({r.value: n for r, n in roles.items()})
    return scripts, workers


async def sse(resp: httpx.Response) -> list[dict]:
    frames = [line async for line in resp.aiter_lines() if line]
    assert frames[-1] == "data: [DONE]" and all(f.startswith("data: ") for f in frames)
    return [json.loads(f[6:]) for f in frames[:-1]]


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))


async def test_agg_full_response_and_usage(env: Env, reply_tokens: list[int]) -> None:
    scripts, workers = await start_workers(env, {P.Role.AGG: 1}, reply_tokens)
    body = (await env.http.post("/v1/chat/completions", json=chat("Hi", temperature=0, seed=5, top_k=3))).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == REPLY
    assert body["choices"][0]["finish_reason"] == "stop"
    req = scripts[P.Role.AGG].received[0]
    assert isinstance(req, P.GenerateRequest) and req.images == ()
    assert (req.sampling.temperature, req.sampling.seed, req.sampling.top_k) == (0.0, 5, 3)
    assert body["usage"] == {"prompt_tokens": len(req.token_ids), "completion_tokens": len(reply_tokens),
                             "total_tokens": len(req.token_ids) + len(reply_tokens)}
    text = (await env.http.get("/metrics")).text
    assert 'triad_requests_total{status="200"} 1.0' in text and "triad_requests_in_flight 0.0" in text
    for w in workers:
        await w.stop()


async def test_agg_stream_stop_string_and_length(env: Env, reply_tokens: list[int]) -> None:
    scripts, workers = await start_workers(env, {P.Role.AGG: 1}, reply_tokens)
    payload = chat([IMG, {"type": "text", "text": "What?"}], stream=True, stop=["STOP"],
                   stream_options={"include_usage": True})
    async with env.http.stream("POST", "/v1/chat/completions", json=payload) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = await sse(resp)
    assert text_of(chunks) == REPLY.split("STOP")[0]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    assert scripts[P.Role.AGG].received[0].images[0].media == P.MediaRef(kind="url", url=IMG["image_url"]["url"])
    body = (await env.http.post("/v1/chat/completions", json=chat("Hi", max_tokens=3))).json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    for w in workers:
        await w.stop()


async def test_epd_two_images_fan_out(env: Env, reply_tokens: list[int]) -> None:
    roles = {P.Role.ENCODE: 2, P.Role.PREFILL: 1, P.Role.DECODE: 1}
    scripts, workers = await start_workers(env, roles, reply_tokens)
    second = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    body = (await env.http.post("/v1/chat/completions", json=chat([IMG, second, {"type": "text", "text": "Diff?"}]))).json()
    assert body["choices"][0]["message"]["content"] == REPLY, body
    enc = [w for w in workers if w.role is P.Role.ENCODE]
    assert sorted(len(w.s.received) for w in enc) == [2, 2]  # one script shared by both encoders
    assert {r.media.url for r in scripts[P.Role.ENCODE].received} == {IMG["image_url"]["url"], second["image_url"]["url"]}
    prefill = scripts[P.Role.PREFILL].received[0]
    assert [i.handle.content_hash for i in prefill.images] == [IMG["image_url"]["url"], second["image_url"]["url"]]
    decode = scripts[P.Role.DECODE].received[0]
    assert decode.first_token == reply_tokens[0] and decode.extras == {"rope_delta": -3}
    assert body["usage"]["prompt_tokens"] == len(prefill.token_ids) + 2 * 3  # as the prefill counted
    assert body["usage"]["completion_tokens"] == len(reply_tokens)
    for w in workers:
        await w.stop()


async def test_pd_sends_media_to_prefill_and_text_skips_encoder(env: Env, reply_tokens: list[int]) -> None:
    scripts, workers = await start_workers(env, {P.Role.PREFILL: 1, P.Role.DECODE: 1}, reply_tokens)
    body = (await env.http.post("/v1/chat/completions", json=chat([IMG, {"type": "text", "text": "?"}]))).json()
    assert body["choices"][0]["message"]["content"] == REPLY
    assert scripts[P.Role.PREFILL].received[0].images[0].media.kind == "url"
    for w in workers:
        await w.stop()


async def test_stop_at_first_token(env: Env, reply_tokens: list[int], tiny_qwen_dir: Path) -> None:
    scripts, workers = await start_workers(env, {P.Role.PREFILL: 1, P.Role.DECODE: 1}, reply_tokens)
    first_text = ChatTokenizer(tiny_qwen_dir).decode(reply_tokens[:1])
    body = (await env.http.post("/v1/chat/completions", json=chat("Hi", stop=[first_text]))).json()
    assert body["choices"][0]["message"]["content"] == "" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 1
    for w in workers:
        await w.stop()


async def test_decode_refusal_frees_the_prefill_kv(env: Env, reply_tokens: list[int]) -> None:
    scripts, workers = await start_workers(env, {P.Role.PREFILL: 1, P.Role.DECODE: 1}, reply_tokens)
    scripts[P.Role.DECODE].error = (503, "the decode KV cache is full")
    err = error_of(await env.http.post("/v1/chat/completions", json=chat("Hi", stream=True)), 503)
    assert err["message"] == "the decode KV cache is full"
    rid = scripts[P.Role.PREFILL].received[0].request_id
    await _until(lambda: scripts[P.Role.PREFILL].cancels == [rid])  # its pinned blocks are freed now
    for w in workers:
        await w.stop()


@pytest.mark.parametrize("role, status", [(P.Role.ENCODE, 400), (P.Role.PREFILL, 413), (P.Role.DECODE, 400)])
async def test_worker_4xx_passes_through(env: Env, reply_tokens: list[int], role: P.Role, status: int) -> None:
    roles = {P.Role.ENCODE: 1, P.Role.PREFILL: 1, P.Role.DECODE: 1}
    scripts, workers = await start_workers(env, roles, reply_tokens)
    scripts[role].error = (status, f"the {role.value} worker says: fix your image")
    resp = await env.http.post("/v1/chat/completions", json=chat([IMG, {"type": "text", "text": "?"}], stream=True))
    err = error_of(resp, status)
    assert err["message"] == f"the {role.value} worker says: fix your image" and err["type"] == "scripted_error"
    for w in workers:
        await w.stop()


@pytest.mark.parametrize("env", [1.0], indirect=True)
async def test_hung_prefill_is_504_and_cancelled(env: Env, reply_tokens: list[int]) -> None:
    scripts, workers = await start_workers(env, {P.Role.PREFILL: 1, P.Role.DECODE: 1}, reply_tokens, hang=True)
    t0 = asyncio.get_running_loop().time()
    err = error_of(await env.http.post("/v1/chat/completions", json=chat("Hi")), 504)
    assert "did not answer within 1 s" in err["message"] and asyncio.get_running_loop().time() - t0 < 5
    await _until(lambda: len(scripts[P.Role.PREFILL].cancels) == 1)
    for w in workers:
        await w.stop()


async def test_vanished_instance_is_routed_around(env: Env, reply_tokens: list[int]) -> None:
    dead = await ScriptedWorker(env, P.Role.AGG, Script(reply_tokens), serve=False).start()
    scripts, workers = await start_workers(env, {P.Role.AGG: 1}, reply_tokens)
    await env.wait_servable({"agg": 2})
    # Concurrent requests spread over both instances by in-flight count, so the dead one gets picked.
    replies = await asyncio.gather(*(env.http.post("/v1/chat/completions", json=chat("Hi")) for _ in range(6)))
    for resp in replies:
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == REPLY
    await dead.stop()
    for w in workers:
        await w.stop()


async def test_client_disconnect_cancels_the_stream(env: Env, reply_tokens: list[int]) -> None:
    scripts, workers = await start_workers(env, {P.Role.AGG: 1}, reply_tokens * 20, token_delay_s=0.05)
    async with httpx.AsyncClient(base_url=env.url, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions", json=chat("Hi", stream=True)) as resp:
            async for line in resp.aiter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break  # got real text: hang up
    await asyncio.wait_for(scripts[P.Role.AGG].stream_cancelled.wait(), 10)
    await _until_metric(env, "triad_requests_in_flight 0.0")
    # a non-streamed request whose client gives up is cancelled too
    scripts[P.Role.AGG].stream_cancelled.clear()
    with pytest.raises(httpx.ReadTimeout):
        await env.http.post("/v1/chat/completions", json=chat("Hi"), timeout=0.5)
    await asyncio.wait_for(scripts[P.Role.AGG].stream_cancelled.wait(), 10)
    for w in workers:
        await w.stop()


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def _until_metric(env: Env, line: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while line not in (await env.http.get("/metrics")).text:
        assert asyncio.get_running_loop().time() < deadline, f"metric never showed {line!r}"
        await asyncio.sleep(0.05)
