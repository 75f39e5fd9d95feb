"""The frontend over real HTTP (uvicorn on a free port) with real etcd and nats-server.

Covers every client error answered before a worker is involved, /v1/models, /health, /live,
/metrics, and the 503 when a model's workers are missing. Fault paths with real workers are in
tests/e2e/test_faults.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from transformers import AutoTokenizer

from common.config import ClusterConfig
from common.discovery import Discovery
from common.protocol import InstanceRecord, ModelCard, Role, instance_prefix
from frontend.app import FrontendConfig, create_app
from tests.support.servers import free_port, start_etcd, start_nats

MODEL = "tiny-vlm"


@pytest.fixture(scope="module")
def planes(tmp_path_factory) -> AsyncIterator[tuple[str, str]]:
    """(etcd url, nats url) of real servers for this module; stopped by PID afterwards."""
    base = tmp_path_factory.mktemp("planes")
    etcd = start_etcd(base)
    try:
        nats = start_nats(base)
    except Exception:
        etcd.stop()
        raise
    yield etcd.url, nats.url
    nats.stop()
    etcd.stop()


@pytest.fixture(scope="module")
def card(tiny_qwen_dir: Path) -> ModelCard:
    hf = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    return ModelCard(name=MODEL, path=str(tiny_qwen_dir), context_length=512,
                     image_token_id=hf.convert_tokens_to_ids("<|image_pad|>"),
                     eos_token_ids=(hf.convert_tokens_to_ids("<|im_end|>"),))


@dataclass
class Env:
    """One test's cluster: its own namespace, clients, and a frontend at ``url``."""

    namespace: str
    disc: Discovery
    http: httpx.AsyncClient
    url: str = ""

    async def add_instance(self, role: Role, instance_id: str | None = None, capacity: int = 1):
        """Register an instance record (lease-bound) as a worker would; returns (record, registration)."""
        iid = instance_id or f"{role.value}-{uuid.uuid4().hex[:6]}"
        rec = InstanceRecord(instance_id=iid, role=role, model=MODEL, subject=instance_prefix(self.namespace, iid),
                             capacity=capacity)
        return rec, await self.disc.register(rec, ttl=5.0)

    async def wait_servable(self, roles: dict[str, int], timeout: float = 10.0) -> dict:
        """Until /health shows at least these instance counts for the model."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            body = (await self.http.get("/health")).json()
            counts = body.get("models", {}).get(MODEL, {}).get("instances", {})
            if all(counts.get(r, 0) >= n for r, n in roles.items()):
                return body
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"frontend never saw {roles}: {body}")
            await asyncio.sleep(0.05)


@asynccontextmanager
async def run_frontend(config: FrontendConfig) -> AsyncIterator[str]:
    """A real uvicorn serving the app on a free loopback port, in this event loop."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                raise RuntimeError(f"frontend did not start: {task.exception()!r}")
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def env(planes: tuple[str, str], card: ModelCard) -> AsyncIterator[Env]:
    """A namespace with the model card published and a frontend."""
    etcd_url, nats_url = planes
    ns = f"t{uuid.uuid4().hex[:10]}"
    disc = await Discovery.connect(etcd_url, ns)
    config = FrontendConfig(cluster=ClusterConfig(namespace=ns, etcd_endpoints=etcd_url, nats_server=nats_url),
                            request_timeout_s=5.0, model_refresh_s=0.5)
    try:
        await disc.put_model_card(card)
        async with run_frontend(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield Env(ns, disc, http, url)
    finally:
        await disc.close()


def chat(content: object = "Hello", **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ----------------------------------------------------------------------------- tests


async def test_client_errors_before_routing(env: Env) -> None:
    post = env.http.post
    err = error_of(await post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in err["message"]
    assert error_of(await post("/v1/chat/completions", json={"model": MODEL}), 400)["param"] == "messages"
    assert "n=3 is not supported" in error_of(await post("/v1/chat/completions", json=chat(n=3)), 400)["message"]
    assert error_of(await post("/v1/chat/completions", json=chat(max_tokens=0)), 400)["param"] == "max_tokens"
    bad_part = chat([{"type": "input_audio", "input_audio": {}}])
    assert "accepted types are 'text' and 'image_url'" in error_of(await post("/v1/chat/completions", json=bad_part), 400)["message"]
    bad_url = chat([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}])
    assert "http(s) URL, a data: URL" in error_of(await post("/v1/chat/completions", json=bad_url), 400)["message"]
    too_many = chat(max_tokens=10_000)
    assert "exceeds the context length 512" in error_of(await post("/v1/chat/completions", json=too_many), 400)["message"]


async def test_unknown_model_is_404_listing_served_models(env: Env) -> None:
    err = error_of(await env.http.post("/v1/chat/completions", json={**chat(), "model": "gpt-9"}), 404)
    assert "'gpt-9' is not served" in err["message"] and repr(MODEL) in err["message"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert (await env.http.get("/v1/models/gpt-9")).status_code == 404


async def test_models_list_and_one_model(env: Env) -> None:
    body = (await env.http.get("/v1/models")).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model" and body["data"][0]["max_model_len"] == 512
    assert (await env.http.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL


async def test_no_workers_is_503_naming_the_missing_role(env: Env) -> None:
    resp = await env.http.get("/health")
    assert resp.status_code == 503 and resp.json()["status"] == "unavailable"
    err = error_of(await env.http.post("/v1/chat/completions", json=chat()), 503)
    assert "no workers are registered" in err["message"]
    _, reg = await env.add_instance(Role.PREFILL)
    await env.wait_servable({"prefill": 1})
    err = error_of(await env.http.post("/v1/chat/completions", json=chat()), 503)
    assert "no live decode worker" in err["message"]
    assert (await env.http.get("/health")).status_code == 503
    await reg.deregister()


async def test_health_turns_ok_with_a_complete_worker_set(env: Env) -> None:
    _, r1 = await env.add_instance(Role.PREFILL)
    _, r2 = await env.add_instance(Role.DECODE)
    body = await env.wait_servable({"prefill": 1, "decode": 1})
    resp = await env.http.get("/health")
    assert resp.status_code == 200 and body["status"] == "ok"
    assert body["models"][MODEL]["topology"] == "ep/d" and body["models"][MODEL]["instances"]["encode"] == 0
    await r2.deregister()
    deadline = asyncio.get_running_loop().time() + 10
    while (await env.http.get("/health")).status_code != 503:  # the dead decode worker is noticed
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    await r1.deregister()


async def test_live_and_metrics(env: Env) -> None:
    assert (await env.http.get("/live")).json() == {"status": "live"}
    await env.http.post("/v1/chat/completions", json=chat(n=2))
    _, reg = await env.add_instance(Role.AGG)
    await env.wait_servable({"agg": 1})
    text = (await env.http.get("/metrics")).text
    assert 'triad_requests_total{status="400"} 1.0' in text
    assert f'triad_live_instances{{model="{MODEL}",role="agg"}} 1.0' in text
    for name in ("triad_time_to_first_token_seconds_bucket", "triad_inter_token_latency_seconds_bucket",
                 "triad_e2e_request_latency_seconds_bucket", "triad_requests_in_flight 0.0",
                 "triad_prompt_tokens_total", "triad_completion_tokens_total"):
        assert name in text
    await reg.deregister()


async def test_model_card_appearing_later_is_picked_up(env: Env, card: ModelCard) -> None:
    await env.disc.put_model_card(card.model_copy(update={"name": "late-model"}))
    err = error_of(await env.http.post("/v1/chat/completions", json={**chat(), "model": "late-model"}), 503)
    assert "'late-model'" in err["message"]  # known now (not 404), just no workers
