"""The serving benchmark client against a real cluster started by launch/agg.sh.

Starts the aggregated topology (its own etcd, nats-server, frontend and one agg worker on free
ports), runs ``python -m tools.bench.serve`` as a subprocess with a few small requests at two
concurrency levels, checks the JSON results and the PNG plot, and stops the launcher by PID."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.e2e.launcher import REPO, TOPOLOGIES, Launch

NUM_PROMPTS = 4
OUTPUT_TOKENS = 8
INPUT_TOKENS = 16


def _bench(base_url: str, tokenizer: str, out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tools.bench.serve", "--base-url", base_url, "--tokenizer", tokenizer,
           "--num-prompts", str(NUM_PROMPTS), "--images-per-request", "1", "--image-size", "64x64",
           "--input-tokens", str(INPUT_TOKENS), "--output-tokens", str(OUTPUT_TOKENS),
           "--concurrency", "1,2", "--warmup", "1", "--result-json", str(out / "result.json"),
           "--plot", str(out / "plot.png")]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def _check_level(level: dict, concurrency: int) -> None:
    assert level["concurrency"] == concurrency
    assert (level["completed"], level["failed"]) == (NUM_PROMPTS, 0), level["errors"]
    assert level["token_mismatches"] == []
    assert level["total_output_tokens"] == NUM_PROMPTS * OUTPUT_TOKENS
    # prompt tokens include the chat template and the image's tokens on top of the text
    assert level["total_input_tokens"] > NUM_PROMPTS * INPUT_TOKENS
    assert level["duration_s"] > 0 and level["request_throughput"] > 0 and level["output_throughput"] > 0
    assert level["total_token_throughput"] > level["output_throughput"]
    ttft, e2e = level["ttft_ms"], level["e2e_ms"]
    assert 0 < ttft["p50"] <= ttft["p99"] and ttft["mean"] > 0
    assert e2e["p50"] >= ttft["p50"] and level["tpot_ms"]["mean"] > 0


def test_bench_serve_against_agg(model_dir: str, tmp_path: Path) -> None:
    launch = Launch(TOPOLOGIES["agg"], model_dir, tmp_path / "run",
                    worker_args="--kv-cache-mb 64", extra_env={"OMP_NUM_THREADS": "1"})
    launch.start(timeout=180)
    try:
        proc = _bench(launch.base_url, model_dir, tmp_path)
    finally:
        leftovers = launch.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not leftovers, f"processes left running after SIGTERM: {leftovers}"
    assert launch.returncode == 0, "\n".join(launch.output[-40:])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["model"] == Path(model_dir).name
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    for level, concurrency in zip(result["levels"], (1, 2)):
        _check_level(level, concurrency)
    assert "TTFT" in proc.stdout and Image.open(tmp_path / "plot.png").format == "PNG"
