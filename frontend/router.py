"""Which workers serve a model, which topology they form, and which instance gets the next request.

The frontend counts its own in-flight requests per instance and picks the live instance with the
fewest per unit of capacity (ties broken at random so equal instances share the load).
"""

from __future__ import annotations

import random
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Iterator, Mapping

from common.protocol import InstanceRecord, Role
from frontend.errors import unavailable


class Topology(str, Enum):
    EPD = "e/p/d"  # encode + prefill + decode instances
    PD = "ep/d"  # prefill (encodes in-process) + decode
    AGG = "agg"


@dataclass(frozen=True)
class ModelInstances:
    """The live instances of one model, by role."""

    model: str
    by_role: Mapping[Role, tuple[InstanceRecord, ...]]

    @classmethod
    def from_snapshot(cls, model: str, records: Iterable[InstanceRecord]) -> "ModelInstances":
        by_role: dict[Role, list[InstanceRecord]] = defaultdict(list)
        for rec in records:
            if rec.model == model:
                by_role[Role(rec.role)].append(rec)
        return cls(model, {role: tuple(recs) for role, recs in by_role.items()})

    def of(self, role: Role) -> tuple[InstanceRecord, ...]:
        return self.by_role.get(role, ())

    def counts(self) -> dict[str, int]:
        return {role.value: len(self.of(role)) for role in Role}

    def topology(self) -> Topology | None:
        """Disaggregated when prefill and decode both exist (with encoders: E/P/D), else agg."""
        if self.of(Role.PREFILL) and self.of(Role.DECODE):
            return Topology.EPD if self.of(Role.ENCODE) else Topology.PD
        if self.of(Role.AGG):
            return Topology.AGG
        return None

    def require_topology(self) -> Topology:
        """The topology to use, or a 503 that says which role is missing."""
        topo = self.topology()
        if topo is None:
            raise unavailable(self.missing_message())
        return topo

    def missing_message(self) -> str:
        have = sorted(r.value for r, recs in self.by_role.items() if recs)
        if not have:
            return f"no workers are registered for model {self.model!r}; start an agg worker or prefill + decode workers"
        if self.of(Role.PREFILL):
            missing = "decode"
        elif self.of(Role.DECODE):
            missing = "prefill"
        else:
            missing = "prefill + decode (or agg)"
        return (f"model {self.model!r} cannot be served: no live {missing} worker "
                f"(live roles: {', '.join(have)}); start one")


class Router:
    """Least-loaded instance choice with in-flight counts kept by the frontend."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._inflight: dict[str, int] = defaultdict(int)
        self._rng = rng or random.Random()

    def load(self, instance_id: str) -> int:
        return self._inflight.get(instance_id, 0)

    def pick(self, candidates: Iterable[InstanceRecord], exclude: set[str] = frozenset()) -> InstanceRecord | None:
        """The candidate with the lowest in-flight/capacity, skipping ``exclude``; None when none is left."""
        live = [c for c in candidates if c.instance_id not in exclude]
        if not live:
            return None
        score = {c.instance_id: self.load(c.instance_id) / max(c.capacity, 1) for c in live}
        best = min(score.values())
        return self._rng.choice([c for c in live if score[c.instance_id] == best])

    @contextmanager
    def track(self, instance_id: str) -> Iterator[None]:
        """Count one request in flight on ``instance_id`` for the duration of the block."""
        self._inflight[instance_id] += 1
        try:
            yield
        finally:
            self._inflight[instance_id] -= 1
            if self._inflight[instance_id] <= 0:
                del self._inflight[instance_id]
