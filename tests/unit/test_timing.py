"""Per-request stage timing (common/timing.py) and the report that turns run logs into a table."""

from __future__ import annotations

import logging
import time

from common.timing import Marks
from tests.perf import timing_report


def _values(line: str) -> dict[str, float]:
    return {k: float(v) for k, _, v in (p.partition("=") for p in line.split()[3:])}


def test_marks_are_deltas_that_add_up_to_the_total():
    t0 = time.perf_counter()
    marks = Marks("req-1", "agg", t0=t0)
    marks.mark("parse", t0 + 0.002)
    marks.mark("media", t0 + 0.010)
    marks.note("emb_mb", 3.5)
    marks.mark("engine", t0 + 0.025)
    line = marks.line()
    assert line.startswith("timing req-1 agg ")
    v = _values(line)
    assert abs(v["parse"] - 2.0) < 1e-6 and abs(v["media"] - 8.0) < 1e-6 and abs(v["engine"] - 15.0) < 1e-6
    assert v["emb_mb"] == 3.5
    assert abs(v["total"] - 25.0) < 1e-6


def test_a_mark_earlier_than_the_last_one_never_moves_time_backwards():
    t0 = time.perf_counter()
    marks = Marks("r", "agg", t0=t0)
    marks.mark("a", t0 + 0.010)
    marks.mark("b", t0 + 0.004)  # a stamp taken on another thread before the last mark
    marks.mark("c", t0 + 0.012)
    v = _values(marks.line())
    assert v["b"] < 0 and abs(v["c"] - 2.0) < 1e-6 and abs(v["total"] - 12.0) < 1e-6


def test_log_writes_one_line_once(caplog):
    marks = Marks("r2", "frontend")
    marks.mark("x")
    with caplog.at_level(logging.INFO, logger="triad.timing"):
        marks.log()
        marks.log()
    lines = [r.getMessage() for r in caplog.records if r.name == "triad.timing"]
    assert len(lines) == 1 and lines[0].startswith("timing r2 frontend x=")


def test_report_medians_and_transfer_share(tmp_path):
    logs = tmp_path / "all.log"
    lines = []
    for i, (pull, kv, ttft) in enumerate([(1.0, 2.0, 100.0), (2.0, 2.0, 50.0), (0.5, 0.5, 100.0)]):
        lines += [f"2026 INFO triad.timing: timing req{i} frontend preprocess=1.0 total={ttft}",
                  f"2026 INFO triad.timing: timing req{i} prefill emb_pull={pull} total=20",
                  f"2026 INFO triad.timing: timing req{i}-img0 encode media=3.0 total=4.0",
                  f"2026 INFO triad.timing: timing req{i} decode kv_pull={kv} total=9"]
    logs.write_text("\n".join(lines + ["unrelated line"]))
    by_kind = timing_report.parse(logs.read_text().splitlines())
    assert set(by_kind) == {"frontend", "prefill", "encode", "decode"}
    assert set(by_kind["encode"]) == {"req0", "req1", "req2"}  # the image suffix is dropped
    table = timing_report.summarize(by_kind)
    assert table["prefill"]["emb_pull"]["p50"] == 1.0 and table["prefill"]["emb_pull"]["n"] == 3
    share = timing_report.transfer_share(by_kind)
    # per request: 3 %, 8 %, 1 % -> median 3 %, p90 8 %
    assert share["n"] == 3 and abs(share["p50_pct"] - 3.0) < 1e-9 and abs(share["p90_pct"] - 8.0) < 1e-9
    assert timing_report.main([str(logs), "--json", str(tmp_path / "t.json")]) == 0
    assert (tmp_path / "t.json").read_text().count("emb_pull") == 1


def test_report_without_timing_lines_fails(tmp_path):
    empty = tmp_path / "x.log"
    empty.write_text("nothing here\n")
    assert timing_report.main([str(empty)]) == 1


def test_engine_step_stats_count_steps_rows_and_tokens(tiny_qwen_dir):
    from common.protocol import SamplingParams
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=str(tiny_qwen_dir), num_kv_blocks=32, max_num_batched_tokens=64))
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    eng.add_request("a", [1, 2, 3, 4, 5], sampling=greedy)
    eng.add_request("b", [6, 7, 8], sampling=greedy)
    while eng.has_unfinished():
        eng.step()
    stats = eng.stats.take()
    # step 1 prefills both prompts (8 tokens, 2 rows), steps 2-4 decode both (1 token each)
    assert (stats.steps, stats.rows, stats.tokens) == (4, 8, 14)
    assert min(stats.schedule_s, stats.launch_s, stats.sample_s, stats.outputs_s) > 0
    assert "4 steps" in stats.line(1.0) and "2.0 seqs" in stats.line(1.0)
    assert eng.stats.steps == 0  # take() started afresh
