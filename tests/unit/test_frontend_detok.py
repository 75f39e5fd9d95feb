"""Incremental detokenization, stop strings across token boundaries, SSE framing, no torch import."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from frontend.completion import Piece, Stats
from frontend.detok import REPLACEMENT, IncrementalDetokenizer, StopMatcher
from frontend.errors import APIError
from frontend.preprocess import ChatTokenizer
from frontend.sse import DONE, sse_events

TEXTS = ["Hello, world! naïve café — 日本語のテキスト 🎉🚀 done.", "ünïcödé ✓✓ 中文 ЖЖЖ ☃ 👍🏽 end",
         "plain ascii text with spaces  and\nnewlines\t tabs"]


@pytest.fixture(scope="module")
def tok(tiny_qwen_dir: Path) -> ChatTokenizer:
    return ChatTokenizer(tiny_qwen_dir)


def _stream(tok: ChatTokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feed ``ids`` in random-sized chunks; return the emitted pieces (flush included)."""
    detok, pieces, i = IncrementalDetokenizer(tok), [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        pieces.append(detok.add(ids[i:i + n]))
        i += n
    pieces.append(detok.flush())
    return pieces


def test_random_token_sequences_match_full_decode(tok: ChatTokenizer) -> None:
    rng = random.Random(0)
    vocab = tok.tokenizer.get_vocab_size()
    for trial in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        pieces = _stream(tok, ids, rng)
        assert "".join(pieces) == tok.decode(ids), f"trial {trial}: {ids}"


def test_multibyte_text_never_emits_broken_characters(tok: ChatTokenizer) -> None:
    rng = random.Random(1)
    for text in TEXTS:
        ids = tok.encode(text)
        assert len(ids) > 5
        pieces = _stream(tok, ids, rng)
        assert "".join(pieces) == text == tok.decode(ids)
        assert not any(REPLACEMENT in p for p in pieces)


def test_byte_at_a_time_emoji_is_held_back(tok: ChatTokenizer) -> None:
    ids = tok.encode("🎉")
    assert len(ids) > 1  # a 4-byte emoji the tiny BPE splits into byte tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🎉" and detok.flush() == ""


def test_special_tokens_are_skipped(tok: ChatTokenizer) -> None:
    ids = tok.encode("Hi<|im_end|>")
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add([t]) for t in ids) + detok.flush() == "Hi"


def _run_stops(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.add(c) for c in chunks)
    if not m.stopped:
        out += m.flush()
    return out, m.stopped


@pytest.mark.parametrize("stops, chunks, expected, stopped", [
    (["STOP"], ["hello S", "T", "O", "P and more"], "hello ", True),
    (["STOP"], ["hello ST", "OPEN"], "hello ", True),
    (["\n\n", "END"], ["a\n", "\nb"], "a", True),
    (["abc"], ["xab", "d"], "xabd", False),  # a partial match that breaks off is released
    (["abc", "b"], ["xab"], "xa", True),  # the earliest stop wins
    (["🎉!"], ["ok 🎉", "!"], "ok ", True),
    (["never"], ["plain ", "text"], "plain text", False),
    ([], ["a", "b"], "ab", False),
])
def test_stop_strings_split_across_chunks(stops: list[str], chunks: list[str], expected: str, stopped: bool) -> None:
    assert _run_stops(stops, chunks) == (expected, stopped)


def test_partial_stop_is_held_back_not_sent() -> None:
    m = StopMatcher(["<END>"])
    assert m.add("text <E") == "text "  # "<E" could still become "<END>"
    assert m.add("N") == ""
    assert m.add("D>") == "" and m.stopped


def test_stop_across_token_boundaries_via_tokenizer(tok: ChatTokenizer) -> None:
    ids = tok.encode("The answer is 42. Thanks!")
    detok, stops, out = IncrementalDetokenizer(tok), StopMatcher(["42."]), ""
    for t in ids:
        out += stops.add(detok.add([t]))
        if stops.stopped:
            break
    assert stops.stopped and out == "The answer is "


async def _pieces(items: list[Piece | Exception]):
    for item in items:
        if isinstance(item, Exception):
            raise item
        yield item


async def _frames(first: Piece | None, rest: list, usage: bool) -> list[str]:
    stats = Stats(prompt_tokens=7, completion_tokens=3, finish_reason="stop")
    return [f async for f in sse_events("chatcmpl-1", "tiny", first, _pieces(rest), stats, usage)]


async def test_sse_framing_with_usage() -> None:
    frames = await _frames(Piece("Hel"), [Piece("lo"), Piece("!", "stop")], usage=True)
    assert all(f.startswith("data: ") and f.endswith("\n\n") for f in frames)
    assert frames[-1] == DONE
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert all(c["id"] == "chatcmpl-1" and c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_sse_without_usage_and_with_midstream_error() -> None:
    frames = await _frames(Piece("a"), [APIError(504, "worker too slow")], usage=False)
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    assert all("usage" not in c for c in chunks if "error" not in c)
    assert chunks[-1] == {"error": {"message": "worker too slow", "type": "timeout_error", "param": None,
                                    "code": 504}}
    assert frames[-1] == DONE


def test_frontend_imports_no_torch() -> None:
    code = ("import sys; from frontend.app import create_app, FrontendConfig; import frontend.__main__; "
            "app = create_app(); assert app is not None; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stdout + res.stderr
