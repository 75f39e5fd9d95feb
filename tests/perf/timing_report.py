"""Per-stage time-to-first-token table from a run's logs (the ``timing`` lines of common/timing.py).

    python tests/perf/timing_report.py RUN_DIR/*.log [--since-line N] [--json out.json]

For every process kind (frontend, agg, encode, prefill, decode) it prints the median and p90 of
each stage over the requests it logged, and, when a request's lines from several processes are
present, the share of the frontend's time-to-first-token spent moving tensors between workers
(prefill's embedding pulls ``emb_pull`` + decode's KV pull ``kv_pull``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

_LINE = re.compile(r"timing (\S+) (\w+) (.*)$")


def parse(lines: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """kind -> request_id -> {stage: value} (values of a repeated name are summed)."""
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for line in lines:
        m = _LINE.search(line)
        if not m:
            continue
        rid, kind, rest = m.groups()
        stages: dict[str, float] = defaultdict(float)
        for item in rest.split():
            name, _, value = item.partition("=")
            try:
                stages[name] += float(value)
            except ValueError:
                continue
        out[kind][rid.removesuffix("-img0")] = dict(stages)
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def summarize(by_kind: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """kind -> stage -> {n, p50, p90}, stages in the order they first appear."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for kind, requests in by_kind.items():
        names: list[str] = []
        for stages in requests.values():
            names.extend(n for n in stages if n not in names)
        table[kind] = {}
        for name in names:
            vals = [s[name] for s in requests.values() if name in s]
            table[kind][name] = {"n": len(vals), "p50": statistics.median(vals),
                                 "p90": percentile(vals, 0.9)}
    return table


def transfer_share(by_kind: dict[str, dict[str, dict[str, float]]]) -> dict[str, float] | None:
    """Median and p90 over requests of (emb_pull + kv_pull) / frontend TTFT, in percent."""
    front = by_kind.get("frontend", {})
    shares = []
    for rid, stages in front.items():
        moved = by_kind.get("prefill", {}).get(rid, {}).get("emb_pull", 0.0)
        moved += by_kind.get("decode", {}).get(rid, {}).get("kv_pull", 0.0)
        if moved and stages.get("total"):
            shares.append(100.0 * moved / stages["total"])
    if not shares:
        return None
    return {"n": len(shares), "p50_pct": statistics.median(shares), "p90_pct": percentile(shares, 0.9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    lines = [line for p in args.logs for line in p.read_text(errors="replace").splitlines()]
    by_kind = parse(lines)
    if not by_kind:
        print("no timing lines found", file=sys.stderr)
        return 1
    table = summarize(by_kind)
    for kind, stages in table.items():
        n = max(v["n"] for v in stages.values())
        print(f"{kind} ({n} requests): " + "  ".join(
            f"{name} {v['p50']:.1f}/{v['p90']:.1f}" for name, v in stages.items()))
    share = transfer_share(by_kind)
    if share:
        print(f"tensor transfer share of TTFT: p50 {share['p50_pct']:.2f}%  p90 {share['p90_pct']:.2f}%"
              f"  ({share['n']} requests)")
    if args.json:
        args.json.write_text(json.dumps({"stages": table, "transfer_share": share}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
