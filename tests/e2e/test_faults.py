"""The frontend's fault paths against real workers (real model, etcd, NATS, UCX, HTTP).

One module-scoped cluster serves three models from one etcd, one nats-server and one frontend:
  - the checkpoint's own name: E/P/D from ``launch/epd.sh`` (2 encode, 1 prefill, 1 decode);
  - ``tiny-agg``: 2 agg workers (``python -m workers``) with a long lease, to kill one;
  - ``tiny-pd``: a prefill worker with 24 KV blocks and a decode worker with only 8 (128 tokens),
    so a long prompt is refused by decode; the prefill logs its free block count whenever it
    frees a request's KV, which is how the tests see that nothing leaks.
A second frontend with a 1.5 s request timeout serves the hung-prefill test.
Which worker served which hop is read from the workers' per-request log lines.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.e2e.launcher import REPO, Launch, Topology
from tests.support.servers import ServerProc, free_port, start_etcd, start_nats

AGG, PD = "tiny-agg", "tiny-pd"
LEASE_TTL_S = 10.0  # long enough that a killed or stopped worker is still registered meanwhile
PD_PREFILL_BLOCKS, PD_DECODE_BLOCKS = 24, 8
HANG_TIMEOUT_S = 1.5
LONG_PROMPT = "red circle " * 80  # about 170 tokens: 11 prefill blocks, more than decode can hold
FREE_ALL = f"{PD_PREFILL_BLOCKS} of {PD_PREFILL_BLOCKS} KV blocks free"


@dataclass
class Proc:
    """A process this module started itself (a worker or a frontend); stopped by its PID."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)  # in case a test left it stopped
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class Cluster:
    launch: Launch
    etcd: ServerProc
    nats: ServerProc
    model_dir: str
    run_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    hang_url: str = ""

    @property
    def url(self) -> str:
        return self.launch.base_url

    @property
    def epd(self) -> str:
        return os.path.basename(self.model_dir.rstrip("/"))

    def log(self, name: str) -> str:
        return self.procs[name].log() if name in self.procs else self.launch.log(name)

    def count(self, name: str, pattern: str) -> int:
        return len(re.findall(pattern, self.log(name)))

    def spawn(self, name: str, argv: list[str]) -> Proc:
        log_path = self.run_dir / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        with open(log_path, "wb") as out:
            popen = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs[name] = Proc(name, popen, log_path)
        return self.procs[name]

    def worker(self, name: str, role: str, model: str, *args: str) -> Proc:
        return self.spawn(name, ["-m", "workers", "--role", role, "--model", self.model_dir,
                                 "--served-model-name", model, "--etcd-endpoints", self.etcd.url,
                                 "--nats-server", self.nats.url, "--lease-ttl-s", str(LEASE_TTL_S),
                                 "--drain-timeout-s", "10", *args])


# ----------------------------------------------------------------------------- the cluster


def _wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def _servable(url: str, want: dict[str, dict[str, int]]) -> bool:
    try:
        models = httpx.get(f"{url}/health", timeout=5).json().get("models", {})
    except (httpx.HTTPError, ValueError):
        return False
    return all(models.get(m, {}).get("instances", {}).get(r, 0) >= n
               for m, counts in want.items() for r, n in counts.items())


def _context(url: str, model: str) -> int | None:
    try:
        return httpx.get(f"{url}/v1/models/{model}", timeout=5).json().get("max_model_len")
    except (httpx.HTTPError, ValueError):
        return None


def _start_direct(c: Cluster) -> None:
    """The tiny-agg and tiny-pd workers. The pd decode starts (and writes the model card) before
    the pd prefill, so the card the frontend uses is the prefill's, with the longer context."""
    common = ("--max-model-len", "1024", "--kv-cache-mb", "16")
    c.worker("pd-decode", "decode", PD, "--num-kv-blocks", str(PD_DECODE_BLOCKS))
    c.worker("agg-0", "agg", AGG, *common)
    c.worker("agg-1", "agg", AGG, *common)


def _start_pd_prefill(c: Cluster) -> None:
    _wait(lambda: "READY" in c.log("pd-decode"), 300, f"pd-decode:\n{c.log('pd-decode')[-3000:]}")
    c.worker("pd-prefill", "prefill", PD, "--num-kv-blocks", str(PD_PREFILL_BLOCKS), "--handle-ttl-s", "60")
    c.hang_url = f"http://127.0.0.1:{free_port()}"
    c.spawn("hang-frontend", ["-m", "frontend", "--http-port", c.hang_url.rsplit(":", 1)[1],
                              "--etcd-endpoints", c.etcd.url, "--nats-server", c.nats.url,
                              "--request-timeout", str(HANG_TIMEOUT_S), "--model-refresh", "0.5"])


def _wait_ready(c: Cluster) -> None:
    want = {c.epd: {"encode": 2, "prefill": 1, "decode": 1}, AGG: {"agg": 2}, PD: {"prefill": 1, "decode": 1}}
    tails = lambda: "\n".join(f"--- {n}\n{p.log()[-1500:]}" for n, p in c.procs.items())  # noqa: E731
    _wait(lambda: _servable(c.url, want), 300, f"the cluster:\n{tails()}")
    for url in (c.url, c.hang_url):
        _wait(lambda: _context(url, PD) == PD_PREFILL_BLOCKS * 16, 30, f"the tiny-pd card at {url}")


@pytest.fixture(scope="module")
def faults(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("faults")
    etcd = start_etcd(base)
    nats = start_nats(base, max_payload=8 * 1024 * 1024)
    topology = Topology("faults-epd", "epd.sh", {"encode": 2, "prefill": 1, "decode": 1})
    launch = Launch(topology, model_dir, base / "run", lease_ttl_s=LEASE_TTL_S,
                    worker_args="--max-model-len 512 --kv-cache-mb 16 --drain-timeout-s 10",
                    extra_env={"OMP_NUM_THREADS": "1", "FRONTEND_ARGS": "--model-refresh 0.5",
                               "ETCD_ENDPOINTS": etcd.url, "NATS_SERVER": nats.url})
    c = Cluster(launch, etcd, nats, model_dir, base)
    try:
        _start_direct(c)
        launch.start(timeout=400)
        _start_pd_prefill(c)
        _wait_ready(c)
        yield c
    finally:
        _teardown(c)


def _teardown(c: Cluster) -> None:
    """Stop everything by PID; every worker but the one killed on purpose (agg-0) must drain."""
    for proc in c.procs.values():
        proc.stop()
    leftovers = c.launch.stop()
    c.nats.stop()
    c.etcd.stop()
    assert not leftovers, f"processes left running after the launch script stopped: {leftovers}"
    workers = {n: p for n, p in c.procs.items() if n.startswith(("agg", "pd")) and n != "agg-0"}
    unclean = [n for n, p in workers.items() if "triad.worker: stopped" not in p.log()[-3000:]]
    assert not unclean and not c.launch.unclean_workers(), f"workers that did not drain: {unclean}"


# ----------------------------------------------------------------------------- helpers


def _png_data_url(size: tuple[int, int] = (56, 56)) -> str:
    img = Image.new("RGB", size, "white")
    img.paste((200, 30, 30), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(model: str, text: str, images: int = 0, **extra: Any) -> dict[str, Any]:
    parts = [{"type": "image_url", "image_url": {"url": _png_data_url()}} for _ in range(images)]
    content: Any = parts + [{"type": "text", "text": text}] if images else text
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0.0, **extra}


def _post(url: str, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def _ok(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return body


def _error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]["message"]


def _stream(url: str, body: dict[str, Any]) -> tuple[str, list[str | None], dict[str, Any] | None]:
    """(text, finish reasons, usage) of a streamed completion."""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in r.iter_lines() if line]
    assert frames[-1] == "data: [DONE]" and all(f.startswith("data: ") for f in frames)
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    return text, reasons, chunks[-1].get("usage")


def _content(body: dict[str, Any]) -> str:
    return body["choices"][0]["message"]["content"]


def _new_request(c: Cluster, taken: dict[str, int], kind: str) -> tuple[str, str] | None:
    """(worker, request id) of the first ``kind`` request logged after ``taken`` (worker -> count)."""
    for name, skip in taken.items():
        ids = re.findall(rf"request (\S+): {kind}", c.log(name))[skip:]
        if ids:
            return name, ids[0]
    return None


def _metric(url: str, line: str) -> bool:
    return line in httpx.get(f"{url}/metrics", timeout=5).text


# ----------------------------------------------------------------------------- agg


def test_agg_full_response_usage_and_sampling(faults: Cluster) -> None:
    full = _ok(_post(faults.url, _body(AGG, "Name a color.", max_tokens=12, ignore_eos=True)))
    assert full["object"] == "chat.completion" and full["choices"][0]["finish_reason"] == "length"
    assert full["usage"]["completion_tokens"] == 12 and _content(full)
    text, reasons, usage = _stream(faults.url, _body(AGG, "Name a color.", max_tokens=12, ignore_eos=True,
                                                      stream_options={"include_usage": True}))
    assert text == _content(full) and reasons[-1] == "length" and usage == full["usage"]
    # Sampling parameters reach the worker: one seed gives one sample, twice.
    sampled = [_content(_ok(_post(faults.url, _body(AGG, "Hi", temperature=1.0, seed=7, top_k=5,
                                                     max_tokens=12, ignore_eos=True)))) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert _metric(faults.url, "triad_requests_in_flight 0.0")
    assert re.search(r'triad_requests_total\{status="200"\} [1-9]', httpx.get(f"{faults.url}/metrics").text)


def test_agg_stream_stop_string_and_length(faults: Cluster) -> None:
    body = _body(AGG, "What is this?", images=1, max_tokens=16, ignore_eos=True)
    full = _content(_ok(_post(faults.url, body)))
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop, f"the reply {full!r} is too short to cut"
    stream_options = {"include_usage": True}
    text, reasons, usage = _stream(faults.url, {**body, "stop": [stop], "stream_options": stream_options})
    assert text == full[:full.find(stop)] and reasons[-1] == "stop"
    text_only = _ok(_post(faults.url, _body(AGG, "What is this?", max_tokens=1)))["usage"]["prompt_tokens"]
    assert usage is not None and usage["prompt_tokens"] > text_only  # the image's tokens were counted
    short = _ok(_post(faults.url, _body(AGG, "Hi", max_tokens=3, ignore_eos=True)))
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3


def test_agg_client_disconnect_cancels_a_non_streamed_request(faults: Cluster) -> None:
    taken = {n: faults.count(n, "GenerateRequest") for n in ("agg-0", "agg-1")}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 1000 tokens
        _post(faults.url, _body(AGG, "Count.", max_tokens=1000, ignore_eos=True), timeout=1.0)
    name, rid = _wait(lambda: _new_request(faults, taken, "GenerateRequest"), 20, "the request at a worker")
    _wait(lambda: f"request {rid}: stream left before the end (cancel); aborting it" in faults.log(name), 20,
          "the agg worker to abort the abandoned request")
    _wait(lambda: _metric(faults.url, "triad_requests_in_flight 0.0"), 20, "in-flight to drop to 0")


def test_agg_vanished_instance_is_routed_around(faults: Cluster) -> None:
    """SIGKILL agg-0: its record stays until its lease expires, yet every request succeeds."""
    served = faults.count("agg-1", "GenerateRequest")
    faults.procs["agg-0"].popen.send_signal(signal.SIGKILL)
    faults.procs["agg-0"].popen.wait(10)
    killed_at = time.monotonic()
    # Concurrent requests spread by in-flight count, so the dead instance does get picked.
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: _post(faults.url, _body(AGG, f"Hi {i}", max_tokens=4)), range(6)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    still = _servable(faults.url, {AGG: {"agg": 2}})
    assert still and time.monotonic() - killed_at < LEASE_TTL_S, "the dead worker's lease ran out first"
    assert faults.count("agg-1", "GenerateRequest") == served + 6


# ----------------------------------------------------------------------------- E/P/D


def test_epd_two_images_fan_out_and_text_skips_encoders(faults: Cluster) -> None:
    encoders = ("encode-0", "encode-1")
    before = [faults.count(n, "EncodeRequest") for n in encoders]
    two = _ok(_post(faults.url, _body(faults.epd, "Which differs?", images=2)))
    assert [faults.count(n, "EncodeRequest") for n in encoders] == [b + 1 for b in before]
    assert "PrefillRequest with 2 image(s)" in faults.log("prefill-0")
    text = _ok(_post(faults.url, _body(faults.epd, "Which differs?")))
    assert [faults.count(n, "EncodeRequest") for n in encoders] == [b + 1 for b in before]
    assert two["usage"]["prompt_tokens"] > text["usage"]["prompt_tokens"] + 2


# ----------------------------------------------------------------------------- P/D


def test_pd_sends_media_to_prefill(faults: Cluster) -> None:
    encoded = sum(faults.count(n, "EncodeRequest") for n in ("encode-0", "encode-1"))
    image = _ok(_post(faults.url, _body(PD, "What?", images=1, max_tokens=4)))
    assert "PrefillRequest with 1 image(s)" in faults.log("pd-prefill")
    assert sum(faults.count(n, "EncodeRequest") for n in ("encode-0", "encode-1")) == encoded
    text = _ok(_post(faults.url, _body(PD, "What?", max_tokens=1)))
    assert image["usage"]["prompt_tokens"] > text["usage"]["prompt_tokens"]  # the image's tokens counted


def test_pd_first_token_ends_the_request(faults: Cluster) -> None:
    decoded = faults.count("pd-decode", "DecodeRequest")
    one = _ok(_post(faults.url, _body(PD, "Hi", max_tokens=1, ignore_eos=True)))
    assert one["choices"][0]["finish_reason"] == "length" and one["usage"]["completion_tokens"] == 1
    assert faults.count("pd-decode", "DecodeRequest") == decoded  # prefill answered kv=None
    first = _content(one)
    assert first, "the first token decodes to no text; pick another prompt"
    stopped = _ok(_post(faults.url, _body(PD, "Hi", stop=[first], ignore_eos=True)))
    assert _content(stopped) == "" and stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 1


def test_pd_decode_refusal_frees_the_prefill_kv(faults: Cluster) -> None:
    """Each long prompt pins 11 of the prefill's 24 blocks; without freeing, the third could not run."""
    for i in range(3):
        freed = faults.count("pd-prefill", FREE_ALL)
        resp = _post(faults.url, _body(PD, LONG_PROMPT, stream=i == 0))  # streamed: still an HTTP status
        assert f"holds at most {PD_DECODE_BLOCKS * 16 - 1} prompt tokens" in _error(resp, 503)
        _wait(lambda: faults.count("pd-prefill", FREE_ALL) > freed, 10, "the prefill to free the KV")
    assert _content(_ok(_post(faults.url, _body(PD, "Hi", max_tokens=4))))


def test_pd_hung_prefill_is_504_and_frees_after(faults: Cluster) -> None:
    prefill = faults.procs["pd-prefill"].popen
    taken = {"pd-prefill": faults.count("pd-prefill", "PrefillRequest")}
    prefill.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        resp = _post(faults.hang_url, _body(PD, "Hi", max_tokens=4), timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        prefill.send_signal(signal.SIGCONT)
    assert f"did not answer within {HANG_TIMEOUT_S:g} s" in _error(resp, 504)
    assert elapsed < HANG_TIMEOUT_S + 3, f"the 504 took {elapsed:.1f} s"
    _, rid = _wait(lambda: _new_request(faults, taken, "PrefillRequest"), 20,
                   "the prefill to take the request once it runs again")
    _wait(lambda: f"request {rid}: cancelled; {FREE_ALL}" in faults.log("pd-prefill"), 20,
          "the prefill to drop the abandoned request")
    released = faults.count("pd-prefill", "KV handle released")
    assert _content(_ok(_post(faults.url, _body(PD, "Hi", max_tokens=4))))
    _wait(lambda: faults.count("pd-prefill", "KV handle released") > released, 10, "the next KV release")
    last = re.findall(r"(\d+) of \d+ KV blocks free", faults.log("pd-prefill"))[-1]
    assert int(last) == PD_PREFILL_BLOCKS, "the hung request still holds prefill KV blocks"
