"""Run the user-facing launch scripts (launch/*.sh) from tests, exactly as a user would.

Each launch runs in its own session (process group) with its own etcd and nats-server (the
script starts them on free ports because ETCD_ENDPOINTS / NATS_SERVER are unset), its HTTP port
from the OS, and a run dir in the test's temp dir where the script records every PID it started.
``stop()`` sends SIGTERM to the script, waits, and then checks that every recorded PID is gone
(leftovers are killed by PID and reported as a failure).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "TRIAD READY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Topology:
    """A named topology: which launch script, with which worker counts."""

    name: str
    script: str
    counts: dict[str, int] = field(default_factory=dict)  # role -> instances

    def env(self) -> dict[str, str]:
        names = {"agg": "NUM_WORKERS", "encode": "NUM_ENCODE", "prefill": "NUM_PREFILL",
                 "decode": "NUM_DECODE"}
        return {names[role]: str(n) for role, n in self.counts.items()}


TOPOLOGIES = {
    "agg": Topology("agg", "agg.sh", {"agg": 1}),
    "ep-d": Topology("ep-d", "disagg.sh", {"prefill": 1, "decode": 1}),
    "e-p-d": Topology("e-p-d", "epd.sh", {"encode": 2, "prefill": 1, "decode": 2}),
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Launch:
    """One running launch script."""

    def __init__(self, topology: Topology, model: str, run_dir: Path, worker_args: str = "",
                 lease_ttl_s: float = 3.0, extra_env: dict[str, str] | None = None) -> None:
        self.topology = topology
        self.model = model
        self.run_dir = run_dir
        self.http_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.lease_ttl_s = lease_ttl_s
        self.output: list[str] = []
        self.killed: set[str] = set()  # names a test killed on purpose
        env = {k: v for k, v in os.environ.items()
               if k not in ("ETCD_ENDPOINTS", "NATS_SERVER", "TRIAD_NAMESPACE")}
        env.update(MODEL=model, HTTP_PORT=str(self.http_port), TRIAD_RUN_DIR=str(run_dir),
                   TRIAD_LEASE_TTL=str(lease_ttl_s), WORKER_ARGS=worker_args,
                   STOP_TIMEOUT="20", **topology.env(), **(extra_env or {}))
        self._env = env
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = 300.0) -> "Launch":
        script = REPO / "launch" / self.topology.script
        self._proc = subprocess.Popen(["bash", str(script)], env=self._env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.output[-60:])
                self.stop()
                raise RuntimeError(f"{self.topology.name} did not become ready:\n{tail}")
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.output.append(line.rstrip("\n"))
            if READY_LINE in line:
                self._ready.set()

    def pids(self) -> dict[str, int]:
        """name -> pid of every process the script started (etcd, nats, frontend, workers)."""
        pid_file = self.run_dir / "pids"
        lines = pid_file.read_text().split("\n") if pid_file.exists() else []
        return {name: int(pid) for name, pid in (ln.split() for ln in lines if ln.strip())}

    def health(self) -> dict[str, int]:
        """role -> live instances, summed over models, from the frontend's /health."""
        body = httpx.get(f"{self.base_url}/health", timeout=5).json()
        counts: dict[str, int] = {}
        for model in body.get("models", {}).values():
            for role, n in model.get("instances", {}).items():
                counts[role] = counts.get(role, 0) + int(n)
        return counts

    def log(self, name: str) -> str:
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 90.0) -> list[str]:
        """SIGTERM the script; returns the names of processes that were still alive after it
        exited (they are killed by PID). An empty list means a clean shutdown."""
        recorded = self.pids()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        time.sleep(0.2)
        leftovers = [name for name, pid in recorded.items() if _alive(pid)]
        for name in leftovers:
            try:
                os.killpg(recorded[name], signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers

    def unclean_workers(self) -> list[str]:
        """Workers (not killed on purpose) whose log does not end with the clean-drain line."""
        roles = ("agg-", "encode-", "prefill-", "decode-")
        return [n for n in self.pids() if n.startswith(roles) and n not in self.killed
                and "triad.worker: stopped" not in self.log(n)[-3000:]]

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()
