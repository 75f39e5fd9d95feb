"""PNG plot of a serving-benchmark sweep: throughput and latency against concurrency."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_levels(levels: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write a three-panel PNG: output/total token and request throughput, TTFT (p50, p90, mean)
    and TPOT (p50, p90, mean), each against the levels' concurrency. ``levels`` are
    LevelStats.to_json() dicts."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt

    xs = [lv["concurrency"] for lv in levels]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    _throughput_panel(left, xs, levels)
    _latency_panel(mid, xs, levels, "ttft_ms", "TTFT")
    _latency_panel(right, xs, levels, "tpot_ms", "TPOT")
    return _save(fig, path, title, dpi=110)


def _save(fig: Any, path: str | Path, title: str, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _throughput_panel(ax: Any, xs: list[int], levels: Sequence[dict[str, Any]]) -> None:
    ax.plot(xs, [lv["output_throughput"] for lv in levels], "o-", label="output tok/s")
    ax.plot(xs, [lv["total_token_throughput"] for lv in levels], "s--", label="total tok/s")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("tokens / s")
    ax.set_title("throughput")
    _log_x(ax, xs)
    twin = ax.twinx()  # requests/s is on a different scale from tokens/s
    twin.plot(xs, [lv["request_throughput"] for lv in levels], "^:", color="tab:green", label="req/s")
    twin.set_ylabel("requests / s")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)


def _latency_panel(ax: Any, xs: list[int], levels: Sequence[dict[str, Any]], metric: str,
                   name: str) -> None:
    for stat, style in (("p50", "o-"), ("p90", "^:"), ("mean", "s--")):
        ys = [lv[metric][stat] for lv in levels]
        ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=f"{name} {stat}")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("ms")
    ax.set_title(name)
    _log_x(ax, xs)
    ax.legend(fontsize=8)


def _log_x(ax: Any, xs: list[int]) -> None:
    """Concurrency sweeps are usually powers of two: a log axis spaces them evenly."""
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.grid(True, alpha=0.3)


def plot_compare(runs: dict[str, Sequence[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """One PNG comparing several sweeps (e.g. agg vs E/P/D, text vs image requests): output
    tokens/s, TTFT p50 and TPOT mean against concurrency, one line per run (label -> levels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("output_throughput", None, "output tokens / s"), ("ttft_ms", "p50", "TTFT p50 (ms)"),
              ("tpot_ms", "mean", "TPOT mean (ms)"))
    for ax, (metric, stat, name) in zip(axes, panels):
        xs_all: list[int] = []
        for label, levels in runs.items():
            xs = [lv["concurrency"] for lv in levels]
            ys = [lv[metric] if stat is None else lv[metric][stat] for lv in levels]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], "o-", label=label)
            xs_all.extend(x for x in xs if x not in xs_all)
        ax.set_xlabel("concurrency")
        ax.set_title(name)
        _log_x(ax, sorted(xs_all))
        ax.legend(fontsize=8)
    return _save(fig, path, title, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    """python -m tools.bench.plot OUT.png LABEL=RESULT.json [LABEL=RESULT.json ...] [--title T]"""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=plot_compare.__doc__)
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+", help="LABEL=path to a --result-json file of tools.bench.serve")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            ap.error(f"{item!r}: write LABEL=RESULT.json")
        runs[label] = json.loads(Path(path).read_text())["levels"]
    print(plot_compare(runs, args.out, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
