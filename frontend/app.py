"""The OpenAI-compatible HTTP API (FastAPI). Imports no torch.

POST /v1/chat/completions runs DESIGN section 2 from the frontend's side:
  1. parse + validate the body (400 with an OpenAI error body before anything is routed)
  2. find the model (404 lists the served ones), render its chat template and tokenize
  3. check some worker set can serve it (503 names the missing role)
  4. hand the request to the orchestrator (encode / prefill / decode or agg over NATS)
  5. detokenize incrementally, apply stop strings, answer as SSE chunks or one response
  6. a client that goes away cancels the request at every worker holding state for it
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from common import protocol as P
from common.config import ClusterConfig
from frontend.cluster import Cluster
from frontend.completion import CompletionRun, Piece
from frontend.errors import APIError, bad_request
from frontend.metrics import FrontendMetrics
from frontend.orchestrator import Orchestrator, OrchestratorConfig
from frontend.preprocess import Prompt, build_prompt
from frontend.registry import ModelRegistry, ServedModel
from frontend.router import ModelInstances
from frontend.schemas import ChatCompletionRequest, ModelEntry, ModelList, parse_chat_request
from frontend.sse import SSEResponse, completion_body, sse_events

log = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; only ever seen in metrics


@dataclass(frozen=True)
class FrontendConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig.from_env)
    request_timeout_s: float = 60.0
    model_refresh_s: float = 2.0

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.model_refresh_s <= 0:
            raise ValueError(f"model_refresh_s must be > 0, got {self.model_refresh_s}")


class Frontend:
    """Everything a request handler needs; built when the app starts."""

    def __init__(self, config: FrontendConfig, cluster: Cluster) -> None:
        self.config = config
        self.cluster = cluster
        self.metrics = FrontendMetrics(cluster.snapshot)
        self.registry = ModelRegistry(cluster.list_cards, cluster.get_card, config.model_refresh_s,
                                      has_instances=lambda name: any(r.model == name for r in cluster.snapshot()))
        self.orchestrator = Orchestrator(cluster.messenger, cluster.snapshot,
                                         config=OrchestratorConfig(request_timeout_s=config.request_timeout_s))

    async def start(self) -> None:
        await self.registry.refresh()
        self.registry.start()

    async def close(self) -> None:
        await self.registry.close()
        await self.orchestrator.drain()
        await self.cluster.close()


class ClientDisconnected(Exception):
    pass


def create_app(config: FrontendConfig | None = None) -> FastAPI:
    """The ASGI app; etcd and NATS are connected when it starts (lifespan), not here."""
    config = config or FrontendConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        frontend = Frontend(config, await Cluster.connect(config.cluster))
        await frontend.start()
        app.state.frontend = frontend
        try:
            yield
        finally:
            await frontend.close()

    app = FastAPI(title="Triad", version="0.1.0", lifespan=lifespan)
    app.add_exception_handler(APIError, _api_error_handler)  # type: ignore[arg-type]
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/live", live, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


def _frontend(request: Request) -> Frontend:
    return request.app.state.frontend


# ----------------------------------------------------------------------------- chat completions


async def chat_completions(request: Request) -> Response:
    fe = _frontend(request)
    fe.metrics.in_flight.inc()
    handed_over = False
    try:
        response = await _chat(fe, request)
        handed_over = isinstance(response, SSEResponse)  # it decrements in_flight when it ends
        fe.metrics.requests.labels(str(response.status_code)).inc()
        return response
    except APIError as exc:
        fe.metrics.requests.labels(str(exc.status)).inc()
        if exc.status >= 500:
            log.warning("request failed: %s %s", exc.status, exc.message)
        return exc.response()
    except ClientDisconnected:
        fe.metrics.requests.labels(str(CLIENT_CLOSED)).inc()
        return Response(status_code=CLIENT_CLOSED)
    finally:
        if not handed_over:
            fe.metrics.in_flight.dec()


async def _chat(fe: Frontend, request: Request) -> Response:
    arrived = time.perf_counter()
    req = parse_chat_request(await _json_body(request))  # 1.
    served = await fe.registry.get(req.model)  # 2.
    prompt = build_prompt(served.tokenizer, served.card, req)
    sampling = _sampling(req, served, prompt)
    fe.orchestrator.instances(req.model).require_topology()  # 3.
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    run = CompletionRun(fe.orchestrator, served.tokenizer, fe.metrics, request_id, req.model, prompt,
                        sampling, req.stop_strings(), started=arrived)
    run.marks.mark("preprocess")  # parse + template + tokenize (+ registry lookup)
    run.start()  # 4.
    pieces = run.pieces()
    try:  # 5. the first piece (or error) before answering, so worker errors keep their HTTP status
        first = await _unless_disconnected(request, anext(pieces, None))
    except BaseException:
        await pieces.aclose()
        raise
    run.marks.mark("first_piece")
    run.marks.log()
    if req.stream:
        body = sse_events(request_id, req.model, first, pieces, run.stats, req.include_usage())
        return SSEResponse(body, on_close=lambda: _stream_closed(fe, run))
    try:
        text = await _unless_disconnected(request, _collect(first, pieces))
    finally:
        await pieces.aclose()  # 6.
    return JSONResponse(completion_body(request_id, req.model, text, run.stats))


def _stream_closed(fe: Frontend, run: CompletionRun) -> None:
    run.cancel()  # 6. (a no-op when the stream ended normally)
    fe.metrics.in_flight.dec()


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def _sampling(req: ChatCompletionRequest, served: ServedModel, prompt: Prompt) -> P.SamplingParams:
    """OpenAI fields -> SamplingParams; the default max_tokens fills the rest of the context."""
    room = served.card.context_length - len(prompt.token_ids)
    max_tokens = req.requested_max_tokens()
    if max_tokens is not None and max_tokens > room:
        raise bad_request(f"max_tokens={max_tokens} plus the {len(prompt.token_ids)}-token prompt exceeds the "
                          f"context length {served.card.context_length} of {served.card.name!r}; "
                          f"ask for at most {room}", param="max_tokens")
    return P.SamplingParams(
        max_tokens=max_tokens or room,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop_token_ids=() if req.ignore_eos else tuple(served.card.eos_token_ids),
        ignore_eos=req.ignore_eos)


async def _collect(first: Piece | None, pieces: AsyncIterator[Piece]) -> str:
    parts = [first.text] if first is not None else []
    async for piece in pieces:
        parts.append(piece.text)
    return "".join(parts)


async def _wait_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is http.disconnect: when the client leaves,
    # or (with some servers) once the response is complete.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; raise ClientDisconnected (and cancel it) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


# ----------------------------------------------------------------------------- other endpoints


async def list_models(request: Request) -> JSONResponse:
    fe = _frontend(request)
    await fe.registry.refresh()
    entries = [_model_entry(m) for m in fe.registry.models()]
    return JSONResponse(ModelList(data=entries).model_dump())


async def get_model(request: Request, model_id: str) -> JSONResponse:
    served = await _frontend(request).registry.get(model_id)
    return JSONResponse(_model_entry(served).model_dump())


def _model_entry(m: ServedModel) -> ModelEntry:
    return ModelEntry(id=m.card.name, created=m.created, max_model_len=m.card.context_length)


async def health(request: Request) -> JSONResponse:
    """200 when at least one model is servable (a tokenizer and a complete worker set), else 503."""
    fe = _frontend(request)
    models: dict[str, Any] = {}
    for m in fe.registry.models():
        view = ModelInstances.from_snapshot(m.card.name, fe.cluster.snapshot())
        topo = view.topology()
        models[m.card.name] = {"instances": view.counts(), "topology": topo.value if topo else None,
                               "servable": topo is not None}
    ok = any(v["servable"] for v in models.values())
    body = {"status": "ok" if ok else "unavailable", "models": models, "time": int(time.time())}
    return JSONResponse(body, status_code=200 if ok else 503)


async def live(request: Request) -> JSONResponse:
    return JSONResponse({"status": "live"})


async def metrics(request: Request) -> Response:
    return Response(_frontend(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
