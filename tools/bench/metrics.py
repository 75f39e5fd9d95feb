"""Serving-benchmark metric math: pure functions over per-request timestamp records.

Definitions (all times in seconds on one monotonic clock, reported in milliseconds):
  TTFT  time from sending the request to the first SSE chunk that carries generated text
  E2E   time from sending the request to the end of the stream
  TPOT  per request: (E2E - TTFT) / (output_tokens - 1); undefined for one-token outputs
  ITL   every gap between two consecutive text-carrying chunks, pooled over all requests
Throughputs divide totals over the completed requests by the wall time of the whole level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestRecord:
    """What one benchmark request saw on the wire."""

    start: float  # when the request was sent
    chunk_times: tuple[float, ...] = ()  # arrival of each chunk that carried text
    end: float = 0.0  # end of the stream (or of the failure)
    output_tokens: int = 0  # from the final usage chunk
    prompt_tokens: int = 0  # from the final usage chunk (template + text + image tokens)
    error: str = ""  # empty when the request completed

    @property
    def ok(self) -> bool:
        return not self.error


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); None for an empty sequence."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} must lie in [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean, p50, p90, p99 of ``values`` multiplied by ``scale`` (seconds -> ms by default)."""
    scaled = [v * scale for v in values]
    out: dict[str, float | None] = {"mean": sum(scaled) / len(scaled) if scaled else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(scaled, q)
    return out


def ttft(rec: RequestRecord) -> float | None:
    """Seconds to the first text-carrying chunk; None when no text arrived."""
    return rec.chunk_times[0] - rec.start if rec.chunk_times else None


def e2e(rec: RequestRecord) -> float:
    return rec.end - rec.start


def tpot(rec: RequestRecord) -> float | None:
    """Mean seconds per output token after the first; None when it is undefined."""
    first = ttft(rec)
    if first is None or rec.output_tokens < 2:
        return None
    return (e2e(rec) - first) / (rec.output_tokens - 1)


def itls(rec: RequestRecord) -> list[float]:
    """Gaps between consecutive text-carrying chunks of one request."""
    times = rec.chunk_times
    return [b - a for a, b in zip(times, times[1:])]


@dataclass(frozen=True)
class LevelStats:
    """Aggregated results of one benchmark level (one concurrency / request-rate setting)."""

    concurrency: int
    request_rate: float
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    token_mismatches: list[dict[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["request_rate"] = _finite_or_str(self.request_rate)
        return out


def _finite_or_str(x: float) -> float | str:
    """JSON has no infinity: an unlimited rate is written as "inf"."""
    return x if math.isfinite(x) else "inf"


def token_mismatches(records: Sequence[RequestRecord], expected: int) -> list[dict[str, int]]:
    """Completed requests whose usage did not report exactly ``expected`` output tokens."""
    return [{"index": i, "output_tokens": r.output_tokens, "expected": expected}
            for i, r in enumerate(records) if r.ok and r.output_tokens != expected]


def aggregate(records: Sequence[RequestRecord], duration_s: float, concurrency: int,
              request_rate: float, expected_output_tokens: int, max_errors: int = 5) -> LevelStats:
    """Fold one level's request records into its metrics."""
    done = [r for r in records if r.ok]
    n_in = sum(r.prompt_tokens for r in done)
    n_out = sum(r.output_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return LevelStats(
        concurrency=concurrency, request_rate=request_rate, duration_s=duration_s,
        completed=len(done), failed=len(records) - len(done),
        total_input_tokens=n_in, total_output_tokens=n_out,
        request_throughput=per_s(len(done)), output_throughput=per_s(n_out),
        total_token_throughput=per_s(n_in + n_out),
        ttft_ms=summarize(_defined(ttft(r) for r in done)),
        tpot_ms=summarize(_defined(tpot(r) for r in done)),
        itl_ms=summarize([gap for r in done for gap in itls(r)]),
        e2e_ms=summarize([e2e(r) for r in done]),
        token_mismatches=token_mismatches(records, expected_output_tokens),
        errors=[r.error for r in records if not r.ok][:max_errors])


def _defined(values: Any) -> list[float]:
    return [v for v in values if v is not None]
