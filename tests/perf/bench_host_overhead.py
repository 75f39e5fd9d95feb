"""Host overhead of the serving path on CPU: output tok/s and the agg worker's CPU per output token.

    .venv/bin/python tests/perf/bench_host_overhead.py [--concurrency 32,64] [--output-tokens 128]

Launches the aggregated topology with ``launch/agg.sh`` (its own etcd, nats-server, frontend and
one agg worker on free ports) with the tiny model (``models/triad-tiny-vlm`` when present, else a
random checkpoint from ``tools.tinyvlm.build``), warms it up, then for each concurrency level runs
``python -m tools.bench.serve`` (text-only streams, ``ignore_eos``, exactly ``--output-tokens``
tokens each) and reads the worker's and the frontend's CPU time from ``/proc/<pid>/stat`` before
and after. With a tiny model the decode step is almost all host work, so CPU seconds per output
token measure what the serving path costs per token (engine thread + asyncio thread + NATS).
Prints one line per level and, with ``--result-json``, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.e2e.launcher import TOPOLOGIES, Launch  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int
    failed: int
    output_tokens: int
    duration_s: float
    output_tok_s: float
    tpot_ms: float
    worker_cpu_s: float
    worker_cpu_us_per_token: float
    frontend_cpu_us_per_token: float


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def model_dir(tmp: Path) -> str:
    shipped = REPO / "models" / "triad-tiny-vlm"
    if (shipped / "config.json").exists():
        return str(shipped)
    from tools.tinyvlm.build import make_random_checkpoint

    return str(make_random_checkpoint(tmp / "tiny-random-vlm"))


def run_bench(launch: Launch, model: str, out: Path, concurrency: int, prompts: int,
              output_tokens: int, warmup: int = 0) -> dict:
    cmd = [sys.executable, "-m", "tools.bench.serve", "--base-url", launch.base_url,
           "--tokenizer", model, "--num-prompts", str(prompts), "--images-per-request", "0",
           "--input-tokens", "32", "--output-tokens", str(output_tokens),
           "--concurrency", str(concurrency), "--warmup", str(warmup), "--request-timeout", "300",
           "--result-json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if not out.exists():
        raise RuntimeError(f"bench client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())["levels"][0]


def measure(launch: Launch, model: str, tmp: Path, concurrency: int, prompts: int,
            output_tokens: int) -> Level:
    pids = launch.pids()
    worker, frontend = pids["agg-0"], pids["frontend"]
    w0, f0 = cpu_seconds(worker), cpu_seconds(frontend)
    lv = run_bench(launch, model, tmp / f"c{concurrency}.json", concurrency, prompts, output_tokens)
    w1, f1 = cpu_seconds(worker), cpu_seconds(frontend)
    tokens = max(int(lv["total_output_tokens"]), 1)
    return Level(concurrency=concurrency, requests=int(lv["completed"]), failed=int(lv["failed"]),
                 output_tokens=tokens, duration_s=round(lv["duration_s"], 2),
                 output_tok_s=round(lv["output_throughput"], 1),
                 tpot_ms=round(lv["tpot_ms"]["mean"], 2), worker_cpu_s=round(w1 - w0, 2),
                 worker_cpu_us_per_token=round((w1 - w0) / tokens * 1e6, 1),
                 frontend_cpu_us_per_token=round((f1 - f0) / tokens * 1e6, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="32,64", help="levels, e.g. 32,64")
    ap.add_argument("--prompts-per-stream", type=int, default=2, help="requests per level = this x concurrency")
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--worker-args", default="--max-num-seqs 64 --kv-cache-mb 256")
    ap.add_argument("--label", default="", help="a name for this run in the output")
    ap.add_argument("--result-json", default="")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="triad-hostbench-") as tmpname:
        tmp = Path(tmpname)
        model = model_dir(tmp)
        launch = Launch(TOPOLOGIES["agg"], model, tmp / "run", worker_args=args.worker_args,
                        extra_env={"OMP_NUM_THREADS": "1"})
        launch.start(timeout=300)
        try:
            run_bench(launch, model, tmp / "warmup.json", 8, 8, 16)
            results = [measure(launch, model, tmp, c, c * args.prompts_per_stream, args.output_tokens)
                       for c in levels]
        finally:
            leftovers = launch.stop()
    for lv in results:
        print(f"{args.label} concurrency {lv.concurrency}: {lv.output_tok_s} output tok/s, "
              f"TPOT {lv.tpot_ms} ms, worker {lv.worker_cpu_us_per_token} CPU-us/token "
              f"({lv.worker_cpu_s} s for {lv.output_tokens} tokens), frontend "
              f"{lv.frontend_cpu_us_per_token} CPU-us/token, failed {lv.failed}")
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(
            {"label": args.label, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
             "levels": [asdict(lv) for lv in results]}, indent=1))
    if leftovers:
        print(f"processes left running after the launcher stopped: {leftovers}", file=sys.stderr)
    return 1 if leftovers or any(lv.failed for lv in results) else 0


if __name__ == "__main__":
    sys.exit(main())
