"""Serving-benchmark math and synthetic requests: percentiles, TTFT/TPOT/ITL from timestamps,
aggregation, exact-length prompts with a real tokenizer, seeded images, the table and the plot."""

from __future__ import annotations

import base64
import io
import json
import math
import random

import pytest
from PIL import Image

from tools.bench.dataset import ExactPrompter, RequestShape, draw_image, make_payload, parse_size
from tools.bench.metrics import RequestRecord, aggregate, e2e, itls, percentile, summarize, tpot, ttft
from tools.bench.serve import format_table, parse_args


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summarize_scales_to_ms() -> None:
    s = summarize([0.001, 0.002, 0.003])
    assert s["mean"] == pytest.approx(2.0)
    assert s["p50"] == pytest.approx(2.0)
    assert s["p99"] == pytest.approx(2.98)
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_request_timings_from_chunk_timestamps() -> None:
    rec = RequestRecord(start=10.0, chunk_times=(10.5, 10.6, 10.8, 11.1), end=11.2, output_tokens=5)
    assert ttft(rec) == pytest.approx(0.5)
    assert e2e(rec) == pytest.approx(1.2)
    assert tpot(rec) == pytest.approx((1.2 - 0.5) / 4)
    assert itls(rec) == pytest.approx([0.1, 0.2, 0.3])


def test_timings_undefined_cases() -> None:
    one = RequestRecord(start=0.0, chunk_times=(0.2,), end=0.25, output_tokens=1)
    assert tpot(one) is None and itls(one) == []
    silent = RequestRecord(start=0.0, end=1.0, output_tokens=3)
    assert ttft(silent) is None and tpot(silent) is None


def test_aggregate_counts_throughput_and_mismatches() -> None:
    good = RequestRecord(start=0.0, chunk_times=(0.1, 0.2, 0.3), end=0.3, output_tokens=3, prompt_tokens=10)
    short = RequestRecord(start=0.0, chunk_times=(0.2, 0.4), end=0.4, output_tokens=2, prompt_tokens=10)
    failed = RequestRecord(start=0.0, end=0.05, error="HTTP 400: bad")
    lv = aggregate([good, short, failed], duration_s=2.0, concurrency=4, request_rate=math.inf,
                   expected_output_tokens=3)
    assert (lv.completed, lv.failed) == (2, 1)
    assert lv.total_output_tokens == 5 and lv.total_input_tokens == 20
    assert lv.request_throughput == pytest.approx(1.0)
    assert lv.output_throughput == pytest.approx(2.5)
    assert lv.total_token_throughput == pytest.approx(12.5)
    assert lv.ttft_ms["mean"] == pytest.approx(150.0)
    assert lv.tpot_ms["p50"] == pytest.approx(150.0)  # (0.3-0.1)/2=0.1 and (0.4-0.2)/1=0.2
    assert lv.itl_ms["mean"] == pytest.approx(1000 * (0.1 + 0.1 + 0.2) / 3)
    assert lv.token_mismatches == [{"index": 1, "output_tokens": 2, "expected": 3}]
    assert lv.errors == ["HTTP 400: bad"]
    doc = json.loads(json.dumps(lv.to_json()))
    assert doc["request_rate"] == "inf"
    assert "conc" in format_table([doc]) and "2/1" in format_table([doc])


@pytest.fixture(scope="module")
def prompter(tmp_path_factory: pytest.TempPathFactory) -> ExactPrompter:
    from tools.tinyvlm.build import make_random_checkpoint

    return ExactPrompter(make_random_checkpoint(tmp_path_factory.mktemp("bench_tok")))


@pytest.mark.parametrize("n", [0, 1, 2, 7, 16, 333, 1000])
def test_prompt_has_exact_token_count(prompter: ExactPrompter, n: int) -> None:
    text = prompter.make(n, random.Random(n))
    assert len(prompter.count(text)) == n


def test_prompt_fallback_path_is_exact(prompter: ExactPrompter) -> None:
    for n in (5, 64, 257):
        assert len(prompter.count(prompter._fix_up(n, random.Random(n)))) == n


def test_prompter_rejects_a_dir_without_tokenizer(tmp_path) -> None:
    with pytest.raises(ValueError, match="--tokenizer"):
        ExactPrompter(tmp_path)


def test_payloads_are_seeded_and_distinct(prompter: ExactPrompter) -> None:
    shape = RequestShape(images_per_request=2, image_size=(48, 32), input_tokens=12, output_tokens=5)
    a, b = make_payload("m", shape, prompter, 0, 0), make_payload("m", shape, prompter, 0, 1)
    assert a == make_payload("m", shape, prompter, 0, 0)
    parts = a["messages"][0]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == 2 and urls[0] != urls[1]
    assert urls[0] not in [p.get("image_url", {}).get("url") for p in b["messages"][0]["content"]]
    img = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert img.size == (48, 32) and img.format == "PNG"
    assert len(prompter.count(parts[-1]["text"])) == 12
    assert a["max_tokens"] == 5 and a["ignore_eos"] is True and a["stream_options"] == {"include_usage": True}


def test_images_differ_by_seed() -> None:
    one = draw_image(random.Random(1), 64, 64).tobytes()
    assert one == draw_image(random.Random(1), 64, 64).tobytes()
    assert one != draw_image(random.Random(2), 64, 64).tobytes()


def test_cli_parsing_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse_args(["--concurrency", "1,2", "--image-size", "64x32", "--request-rate", "inf",
                      "--base-url", "http://h:1/"])
    assert cfg.concurrency == (1, 2) and cfg.shape.image_size == (64, 32)
    assert math.isinf(cfg.request_rate) and cfg.base_url == "http://h:1"
    assert parse_size("512x384") == (512, 384)
    for bad in (["--image-size", "512"], ["--concurrency", "0"], ["--output-tokens", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_plot_writes_png(tmp_path) -> None:
    from tools.bench.plot import plot_levels

    rec = RequestRecord(start=0.0, chunk_times=(0.1, 0.2), end=0.2, output_tokens=2, prompt_tokens=4)
    levels = [aggregate([rec], 1.0, c, math.inf, 2).to_json() for c in (1, 2, 4)]
    out = plot_levels(levels, tmp_path / "p.png", title="t")
    assert Image.open(out).format == "PNG"


def test_compare_plot_from_result_files(tmp_path) -> None:
    import json

    from tools.bench.plot import main

    def level(c: int, tput: float) -> dict:
        lat = {"mean": 10.0 * c, "p50": 9.0 * c, "p90": 12.0 * c, "p99": 15.0 * c}
        return {"concurrency": c, "output_throughput": tput, "ttft_ms": lat, "tpot_ms": lat}

    for name, scale in (("a", 1.0), ("b", 0.9)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"levels": [level(64, 5000 * scale),
                                                                       level(128, 7000 * scale)]}))
    out = tmp_path / "cmp.png"
    assert main([str(out), f"agg={tmp_path / 'a.json'}", f"epd={tmp_path / 'b.json'}", "--title", "t"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main([str(out), "no-label.json"])
