"""Prometheus metrics of the frontend, in a registry of its own (several apps may share a process)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from common.protocol import InstanceRecord

# Latency buckets (seconds): token gaps are ms-scale, whole requests up to minutes.
_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_E2E = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _LiveInstances:
    """Collects ``triad_live_instances{model,role}`` from the discovery snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Iterable[InstanceRecord]]) -> None:
        self._snapshot = snapshot

    def collect(self):  # noqa: ANN201 (prometheus_client collector protocol)
        family = GaugeMetricFamily("triad_live_instances", "Live worker instances per model and role",
                                   labels=["model", "role"])
        counts: dict[tuple[str, str], int] = {}
        for rec in self._snapshot():
            key = (rec.model, rec.role.value if hasattr(rec.role, "value") else str(rec.role))
            counts[key] = counts.get(key, 0) + 1
        for (model, role), n in sorted(counts.items()):
            family.add_metric([model, role], n)
        yield family


class FrontendMetrics:
    """Request counts, latencies, in-flight requests, token counters, live instances."""

    def __init__(self, snapshot: Callable[[], Iterable[InstanceRecord]] = tuple) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("triad_requests", "Chat completion requests by HTTP status",
                                ["status"], registry=r)
        self.ttft = Histogram("triad_time_to_first_token_seconds", "Time to first token", buckets=_TTFT, registry=r)
        self.itl = Histogram("triad_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_ITL, registry=r)
        self.e2e = Histogram("triad_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=_E2E, registry=r)
        self.in_flight = Gauge("triad_requests_in_flight", "Requests being served", registry=r)
        self.prompt_tokens = Counter("triad_prompt_tokens", "Prompt tokens (after image expansion)", registry=r)
        self.completion_tokens = Counter("triad_completion_tokens", "Generated tokens", registry=r)
        r.register(_LiveInstances(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
