"""Serving benchmark client for an OpenAI-compatible chat endpoint (in the spirit of `vllm bench serve`).

    python -m tools.bench.serve --base-url http://127.0.0.1:8000 --num-prompts 64 \\
        --images-per-request 1 --image-size 512x512 --input-tokens 1000 --output-tokens 1000 \\
        --concurrency 1,8,32,64 --result-json out.json --plot out.png

For each concurrency level it sends ``--num-prompts`` fresh synthetic streaming requests (their
own images and text, so caches do not help), optionally paced as a Poisson process
(``--request-rate``), records the SSE timestamps of every request, and reports TTFT, TPOT, ITL
and end-to-end latency (mean, p50, p90, p99) plus request/token throughput. Each request asks for
exactly ``--output-tokens`` tokens (``max_tokens`` with ``ignore_eos``); the usage chunk must
confirm it, and every mismatch is reported. Exit status 1 when any request failed or mismatched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from tools.bench.dataset import ExactPrompter, RequestShape, make_payload, parse_size
from tools.bench.metrics import LevelStats, RequestRecord, aggregate

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: where to send, what to send, and the sweep."""

    base_url: str = "http://127.0.0.1:8000"
    model: str = ""  # empty: the first model the server lists
    tokenizer: str = str(REPO / "models" / "triad-tiny-vlm")
    shape: RequestShape = RequestShape()
    num_prompts: int = 64
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    request_rate: float = math.inf  # requests/s of the Poisson arrivals; inf = all at once
    warmup: int = 2
    seed: int = 0
    request_timeout_s: float = 600.0
    result_json: str = ""
    plot: str = ""

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"--concurrency needs whole numbers >= 1, got {self.concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 or 'inf', got {self.request_rate}")
        if min(self.warmup, self.shape.images_per_request, self.shape.input_tokens) < 0:
            raise ValueError("--warmup, --images-per-request and --input-tokens must be >= 0")
        if self.shape.output_tokens < 1:
            raise ValueError(f"--output-tokens must be >= 1, got {self.shape.output_tokens}")


# ----------------------------------------------------------------------------- one request


async def send_request(client: httpx.AsyncClient, url: str, body: bytes) -> RequestRecord:
    """POST one streaming request and time its SSE chunks; failures become an error record."""
    start = time.perf_counter()
    state: dict[str, Any] = {"times": [], "usage": None, "error": ""}
    try:
        async with client.stream("POST", url, content=body,
                                 headers={"Content-Type": "application/json"}) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                state["error"] = f"HTTP {resp.status_code}: {text[:300]}"
            else:
                await _read_stream(resp, state)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        state["error"] = f"{type(exc).__name__}: {exc}"
    return _record(start, time.perf_counter(), state)


async def _read_stream(resp: httpx.Response, state: dict[str, Any]) -> None:
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        _on_chunk(json.loads(data), time.perf_counter(), state)


def _on_chunk(chunk: dict[str, Any], now: float, state: dict[str, Any]) -> None:
    if "error" in chunk:
        state["error"] = f"stream error: {chunk['error'].get('message', chunk['error'])}"
    for choice in chunk.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            state["times"].append(now)
    if chunk.get("usage"):
        state["usage"] = chunk["usage"]


def _record(start: float, end: float, state: dict[str, Any]) -> RequestRecord:
    usage, error = state["usage"], state["error"]
    if not error and usage is None:
        error = "the stream ended without a usage chunk (does the server honour stream_options.include_usage?)"
    usage = usage or {}
    return RequestRecord(start=start, chunk_times=tuple(state["times"]), end=end,
                         output_tokens=int(usage.get("completion_tokens") or 0),
                         prompt_tokens=int(usage.get("prompt_tokens") or 0), error=error)


# ----------------------------------------------------------------------------- one level


async def run_level(client: httpx.AsyncClient, url: str, bodies: list[bytes], concurrency: int,
                    request_rate: float, rng: random.Random, desc: str) -> tuple[list[RequestRecord], float]:
    """Send ``bodies`` with at most ``concurrency`` in flight, arrivals paced by ``request_rate``;
    returns the records (in body order) and the level's wall time."""
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(bodies), desc=desc, unit="req", file=sys.stderr, leave=False)

    async def one(body: bytes) -> RequestRecord:
        async with gate:
            rec = await send_request(client, url, body)
        bar.update(1)
        return rec

    start = time.perf_counter()
    tasks = []
    for i, body in enumerate(bodies):
        if i and math.isfinite(request_rate):
            await asyncio.sleep(rng.expovariate(request_rate))  # Poisson process: exponential gaps
        tasks.append(asyncio.create_task(one(body)))
    records = list(await asyncio.gather(*tasks))
    bar.close()
    return records, time.perf_counter() - start


def build_bodies(cfg: BenchConfig, model: str, prompter: ExactPrompter, first_index: int,
                 count: int) -> list[bytes]:
    """Pre-serialized request bodies, so building them costs nothing inside the timed window."""
    return [json.dumps(make_payload(model, cfg.shape, prompter, cfg.seed, first_index + i)).encode()
            for i in range(count)]


async def resolve_model(client: httpx.AsyncClient, cfg: BenchConfig) -> str:
    """The model to ask for: --model, else the first one GET /v1/models lists."""
    try:
        resp = await client.get(f"{cfg.base_url}/v1/models", timeout=10)
        resp.raise_for_status()
        served = [m["id"] for m in resp.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: cannot list models at {cfg.base_url}/v1/models ({exc}); "
                         "start a server (e.g. launch/agg.sh) or fix --base-url") from None
    if cfg.model and cfg.model not in served:
        raise SystemExit(f"error: --model {cfg.model!r} is not served at {cfg.base_url}; served: {served}")
    if cfg.model:
        return cfg.model
    if not served:
        raise SystemExit(f"error: {cfg.base_url} serves no model yet; wait for its workers or pass --model")
    return served[0]


async def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Warm up, then run every concurrency level; returns the result document."""
    prompter = ExactPrompter(cfg.tokenizer)
    rng = random.Random(cfg.seed)
    limits = httpx.Limits(max_connections=max(cfg.concurrency), max_keepalive_connections=max(cfg.concurrency))
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = await resolve_model(client, cfg)
        url = f"{cfg.base_url}/v1/chat/completions"
        levels: list[LevelStats] = []
        warm = build_bodies(cfg, model, prompter, len(cfg.concurrency) * cfg.num_prompts, cfg.warmup)
        if warm:
            await _warm_up(client, url, warm, min(cfg.warmup, max(cfg.concurrency)), rng)
        for n, concurrency in enumerate(cfg.concurrency):
            bodies = build_bodies(cfg, model, prompter, n * cfg.num_prompts, cfg.num_prompts)
            records, duration = await run_level(client, url, bodies, concurrency, cfg.request_rate, rng,
                                                f"concurrency {concurrency}")
            levels.append(aggregate(records, duration, concurrency, cfg.request_rate, cfg.shape.output_tokens))
    return {"model": model, "config": _config_json(cfg), "levels": [lv.to_json() for lv in levels]}


async def _warm_up(client: httpx.AsyncClient, url: str, bodies: list[bytes], concurrency: int,
                   rng: random.Random) -> None:
    records, _ = await run_level(client, url, bodies, concurrency, math.inf, rng, "warm-up")
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(records)} warm-up requests failed; first: {failed[0]}")


def _config_json(cfg: BenchConfig) -> dict[str, Any]:
    out = asdict(cfg)
    out["request_rate"] = cfg.request_rate if math.isfinite(cfg.request_rate) else "inf"
    out["shape"]["image_size"] = "x".join(map(str, cfg.shape.image_size))
    return out


# ----------------------------------------------------------------------------- report


_COLUMNS = (("conc", 5), ("ok/fail", 8), ("dur s", 7), ("req/s", 7), ("out tok/s", 10), ("tot tok/s", 10),
            ("TTFT mean/p50/p99 ms", 22), ("TPOT mean/p50/p99 ms", 22), ("ITL p50/p99 ms", 16),
            ("E2E p50/p99 ms", 18), ("mismatch", 8))


def _fmt(*values: float | None) -> str:
    return "/".join("-" if v is None else f"{v:.1f}" for v in values)


def format_table(levels: list[dict[str, Any]]) -> str:
    """A fixed-width text table, one row per level."""
    rows = [" ".join(name.rjust(w) for name, w in _COLUMNS)]
    for lv in levels:
        t, p, i, e = lv["ttft_ms"], lv["tpot_ms"], lv["itl_ms"], lv["e2e_ms"]
        cells = (str(lv["concurrency"]), f"{lv['completed']}/{lv['failed']}", f"{lv['duration_s']:.2f}",
                 f"{lv['request_throughput']:.2f}", f"{lv['output_throughput']:.1f}",
                 f"{lv['total_token_throughput']:.1f}", _fmt(t["mean"], t["p50"], t["p99"]),
                 _fmt(p["mean"], p["p50"], p["p99"]), _fmt(i["p50"], i["p99"]), _fmt(e["p50"], e["p99"]),
                 str(len(lv["token_mismatches"])))
        rows.append(" ".join(c.rjust(w) for c, (_, w) in zip(cells, _COLUMNS)))
    return "\n".join(rows)


def report(result: dict[str, Any], cfg: BenchConfig) -> int:
    """Print the table, write the JSON and the plot; the exit status (1 on failures/mismatches)."""
    levels = result["levels"]
    print(f"model {result['model']} | {cfg.num_prompts} prompts/level | {cfg.shape.images_per_request} image(s) "
          f"{'x'.join(map(str, cfg.shape.image_size))} | {cfg.shape.input_tokens} in / "
          f"{cfg.shape.output_tokens} out tokens | rate {result['config']['request_rate']} req/s")
    print(format_table(levels))
    for lv in levels:
        for err in lv["errors"]:
            print(f"  concurrency {lv['concurrency']}: failed: {err}", file=sys.stderr)
        for mm in lv["token_mismatches"][:5]:
            print(f"  concurrency {lv['concurrency']}: request {mm['index']} got {mm['output_tokens']} "
                  f"output tokens, expected {mm['expected']}", file=sys.stderr)
    if cfg.result_json:
        Path(cfg.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.result_json).write_text(json.dumps(result, indent=2))
        print(f"results: {cfg.result_json}")
    if cfg.plot:
        from tools.bench.plot import plot_levels

        print(f"plot: {plot_levels(levels, cfg.plot, title=str(result['model']))}")
    bad = any(lv["failed"] or lv["token_mismatches"] for lv in levels)
    return 1 if bad else 0


# ----------------------------------------------------------------------------- CLI


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated whole numbers, e.g. 1,8,32") from None


def _rate(text: str) -> float:
    try:
        return float(text)  # float("inf") parses "inf"
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of requests/s or 'inf'") from None


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    d, s = BenchConfig(), RequestShape()
    ap = argparse.ArgumentParser(prog="python -m tools.bench.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=d.base_url, help="the server, without /v1")
    ap.add_argument("--model", default=d.model, help="served model name (default: the first in /v1/models)")
    ap.add_argument("--tokenizer", default=d.tokenizer, help="model dir with the served model's tokenizer.json")
    ap.add_argument("--num-prompts", type=int, default=d.num_prompts, help="requests per concurrency level")
    ap.add_argument("--images-per-request", type=int, default=s.images_per_request)
    ap.add_argument("--image-size", default="x".join(map(str, s.image_size)), help="WIDTHxHEIGHT")
    ap.add_argument("--image-format", default=s.image_format, choices=["png", "jpeg"])
    ap.add_argument("--input-tokens", type=int, default=s.input_tokens, help="text tokens per request (exact)")
    ap.add_argument("--output-tokens", type=int, default=s.output_tokens, help="max_tokens, with ignore_eos")
    ap.add_argument("--temperature", type=float, default=s.temperature)
    ap.add_argument("--concurrency", type=_int_list, default=d.concurrency, help="levels to sweep, e.g. 1,8,32,64")
    ap.add_argument("--request-rate", type=_rate, default=d.request_rate, help="Poisson arrivals per second, or inf")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed requests before the sweep")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--request-timeout", type=float, default=d.request_timeout_s, help="seconds per request")
    ap.add_argument("--result-json", default=d.result_json, help="write the results here")
    ap.add_argument("--plot", default=d.plot, help="write a PNG plot here")
    a = ap.parse_args(argv)
    try:
        shape = RequestShape(a.images_per_request, parse_size(a.image_size), a.image_format, a.input_tokens,
                             a.output_tokens, a.temperature)
        return BenchConfig(a.base_url.rstrip("/"), a.model, a.tokenizer, shape, a.num_prompts, a.concurrency,
                           a.request_rate, a.warmup, a.seed, a.request_timeout, a.result_json, a.plot)
    except ValueError as exc:
        ap.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        result = asyncio.run(run_benchmark(cfg))
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return report(result, cfg)


if __name__ == "__main__":
    sys.exit(main())
