"""Where one request's time goes inside one process: named stage marks, logged as one line.

Each process that handles a hop of a request (frontend, encode, prefill, decode, agg) keeps a
``Marks`` for it and, once the request's first token is out (or its hop is done), logs

    timing <request_id> <process-kind> stage1=1.23 stage2=0.45 ... total=9.87

on the ``triad.timing`` logger: every value is the milliseconds since the previous mark, and
``total`` the milliseconds since the hop began. Values named ``*_mb`` are sizes, not times
(``note``). Only this process's clock is used, so lines from processes on different nodes never
need synchronised clocks. ``tests/perf/timing_report.py`` turns a run's logs into a per-stage table
(medians over requests), which is how the time-to-first-token budget in docs/benchmarks.md was
broken down.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("triad.timing")


class Marks:
    """Stage marks of one request in one process (cheap: a list append per mark)."""

    __slots__ = ("request_id", "kind", "t0", "_last", "_parts", "_logged")

    def __init__(self, request_id: str, kind: str, t0: float | None = None) -> None:
        self.request_id = request_id
        self.kind = kind
        self.t0 = time.perf_counter() if t0 is None else t0
        self._last = self.t0
        self._parts: list[tuple[str, float]] = []
        self._logged = False

    def mark(self, stage: str, at: float | None = None) -> None:
        """The stage ``stage`` ended now (or at ``at``, a perf_counter value of this process)."""
        now = time.perf_counter() if at is None else at
        self._parts.append((stage, (now - self._last) * 1e3))
        self._last = max(self._last, now)

    def note(self, name: str, value: float) -> None:
        """A number that is not a duration (e.g. megabytes pulled)."""
        self._parts.append((name, value))

    def line(self) -> str:
        total = (self._last - self.t0) * 1e3
        parts = " ".join(f"{name}={value:.2f}" for name, value in self._parts)
        return f"timing {self.request_id} {self.kind} {parts} total={total:.2f}"

    def log(self) -> None:
        """Log the line once (later calls do nothing)."""
        if not self._logged:
            self._logged = True
            log.info("%s", self.line())
