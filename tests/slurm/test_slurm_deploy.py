"""deploy/slurm/triad_srun.sh on a real 2-node Slurm cluster (slurmctld + 2 slurmd on loopback).

The deployment runs the way a user runs it: `salloc -N2 bash deploy/slurm/triad_srun.sh`, with
etcd, NATS and the frontend as srun steps on the head (node1) and the workers as srun steps on
node2. Every test stops what it started and checks that no job or step process is left.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.support.slurm import (SallocDeployment, SlurmCluster, describe_pids, squeue_jobs,
                                wait_no_strays)

pytestmark = pytest.mark.slurm
SBATCH = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "triad.sbatch"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _assert_all_gone(cluster: SlurmCluster, dep: SallocDeployment, ports: list[int]) -> None:
    strays = wait_no_strays(cluster)
    assert not strays, f"left behind: {describe_pids(strays)}\n{dep.output()}"
    assert squeue_jobs(cluster) == "", "the allocation is still in the queue"
    assert not [p for p in ports if _port_open(p)], "a server still listens after the stop"


def test_cluster_runs_steps_on_both_nodes(slurm_cluster: SlurmCluster) -> None:
    script = ("srun --overlap -N2 -n2 bash -c 'echo $SLURMD_NODENAME'; "
              "scontrol show hostnames $SLURM_JOB_NODELIST")
    res = slurm_cluster.run(["salloc", "-N2", "bash", "-c", script], timeout=60)
    lines = res.stdout.split()
    assert sorted(lines[:2]) == ["node1", "node2"], res.stdout
    assert lines[2:] == ["node1", "node2"], res.stdout


def test_control_plane_starts_on_head_and_stops(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    dep = SallocDeployment(slurm_cluster, tmp_path / "run", CONTROL_PLANE_ONLY="1",
                           MODEL=str(tmp_path)).start(limit_s=180)
    try:
        dep.wait_ready(timeout=60)
        etcd_port, nats_port = int(dep.env["TRIAD_ETCD_PORT"]), int(dep.env["TRIAD_NATS_PORT"])
        health = httpx.get(f"http://127.0.0.1:{etcd_port}/health", timeout=5).json()
        assert health["health"] == "true"
        assert _port_open(nats_port)
        steps = (dep.run_dir / "steps.txt").read_text().split()
        # "<job>.<step> triad-<name>": both servers are srun steps of the allocation
        names = dict(zip(steps[1::2], steps[0::2]))
        assert set(names) == {"triad-etcd", "triad-nats"}, steps
        assert all("." in step_id for step_id in names.values())
    finally:
        rc = dep.stop()
    assert rc == 0, dep.output()
    assert "stopped" in dep.output()
    _assert_all_gone(slurm_cluster, dep, [etcd_port, nats_port])


def test_worker_that_fails_ends_deployment_cleanly(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    dep = SallocDeployment(slurm_cluster, tmp_path / "run", TOPOLOGY="agg", MODEL=str(tmp_path),
                           WORKER_ARGS="--no-such-flag-for-the-test").start(limit_s=180)
    try:
        rc = dep.proc.wait(timeout=150)  # it must end by itself, not wait for READY_TIMEOUT
    finally:
        dep.stop()
    out = dep.output()
    assert rc != 0, out
    assert "ERROR:" in out and "exited" in out, out
    assert "stopped" in out, out  # the EXIT trap ran: etcd and NATS were stopped
    _assert_all_gone(slurm_cluster, dep, [int(dep.env["TRIAD_ETCD_PORT"])])


def test_sbatch_example_runs_and_stops_on_scancel(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """deploy/slurm/triad.sbatch as documented; `scancel --signal=TERM --batch` stops it cleanly."""
    dep = SallocDeployment(slurm_cluster, tmp_path / "run", CONTROL_PLANE_ONLY="1", MODEL=str(tmp_path))
    out_file = tmp_path / "triad-%j.out"
    res = slurm_cluster.run(["sbatch", "--parsable", "-N2", f"--output={out_file}",
                             str(SBATCH)], timeout=30, TRIAD_REPO=str(SBATCH.parents[2]), **dep.env)
    job_id = res.stdout.strip().split(";")[0]
    out_path = tmp_path / f"triad-{job_id}.out"
    try:
        deadline = time.monotonic() + 60
        while not (dep.run_dir / "ready").exists():
            assert time.monotonic() < deadline, f"sbatch job not ready: {squeue_jobs(slurm_cluster)}"
            time.sleep(0.5)
        assert _port_open(int(dep.env["TRIAD_NATS_PORT"]))
    finally:
        slurm_cluster.run(["scancel", "--signal=TERM", "--batch", job_id], timeout=20, check=False)
        deadline = time.monotonic() + 60
        while squeue_jobs(slurm_cluster) and time.monotonic() < deadline:
            time.sleep(0.5)
    output = out_path.read_text() if out_path.exists() else ""
    assert "stopped" in output, output
    state = slurm_cluster.run(["scontrol", "show", "job", job_id], timeout=20, check=False).stdout
    assert "JobState=COMPLETED" in state or not state.strip(), state
    _assert_all_gone(slurm_cluster, dep, [int(dep.env["TRIAD_ETCD_PORT"]), int(dep.env["TRIAD_NATS_PORT"])])


# ---- end to end: E/P/D over two nodes answers exactly as agg --------------------------------

def _image_data_url() -> str:
    im = Image.new("RGB", (224, 224), (40, 90, 160))
    ImageDraw.Draw(im).rectangle((30, 40, 150, 190), fill=(230, 200, 20))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _requests(model: str) -> list[dict]:
    text = [{"role": "user", "content": "Say something about the sea."}]
    image = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _image_data_url()}},
        {"type": "text", "text": "What is in this picture?"}]}]
    return [{"model": model, "messages": m, "max_tokens": 12, "temperature": 0.0}
            for m in (text, image)]


def _answers(dep: SallocDeployment) -> list[tuple[str, str, dict]]:
    model = httpx.get(f"{dep.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    out = []
    for body in _requests(model):
        r = httpx.post(f"{dep.base_url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        out.append((choice["message"]["content"], choice["finish_reason"], r.json()["usage"]))
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tools.tinyvlm.build import make_random_checkpoint
    return make_random_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.timeout(900)
def test_epd_over_two_nodes_matches_agg(slurm_cluster: SlurmCluster, tmp_path: Path,
                                        tiny_model: Path) -> None:
    common = {"MODEL": str(tiny_model), "TRIAD_LEASE_TTL": "3", "READY_TIMEOUT": "600"}
    epd = SallocDeployment(slurm_cluster, tmp_path / "epd", TOPOLOGY="epd", **common)
    agg = SallocDeployment(slurm_cluster, tmp_path / "agg", TOPOLOGY="agg", **common)
    try:
        # Both allocations fit at once (each takes one CPU per node), so they start together.
        epd.start(limit_s=840), agg.start(limit_s=840)
        epd.wait_ready(timeout=600)
        agg.wait_ready(timeout=600)
        health = httpx.get(f"{epd.base_url}/health", timeout=10)
        assert health.status_code == 200, health.text
        worker_logs = epd.worker_logs()
        for role in ("encode", "prefill", "decode"):
            assert f"w-{role}-0.log" in worker_logs
        # one head + one worker node: every worker ran on node2, advertising its node's address
        assert worker_logs.count("worker on node2 addr=127.0.0.1") == 3, worker_logs
        epd_answers, agg_answers = _answers(epd), _answers(agg)
        diffs = [f"request {i}: E/P/D {e!r} != agg {a!r}"
                 for i, (e, a) in enumerate(zip(epd_answers, agg_answers)) if e != a]
        assert not diffs, "\n".join(diffs)
        assert all(usage["completion_tokens"] > 0 for _, _, usage in epd_answers)
        assert epd_answers[1][2]["prompt_tokens"] > epd_answers[0][2]["prompt_tokens"]  # image tokens
    finally:
        rcs = [epd.stop(), agg.stop()]
    assert rcs == [0, 0], epd.output() + agg.output()
    ports = [int(d.env[k]) for d in (epd, agg) for k in ("TRIAD_ETCD_PORT", "TRIAD_NATS_PORT")]
    _assert_all_gone(slurm_cluster, epd, ports + [epd.http_port, agg.http_port])
    steps = json.dumps((epd.run_dir / "steps.txt").read_text().split())
    assert all(f"triad-w-{r}-0" in steps for r in ("encode", "prefill", "decode")), steps
