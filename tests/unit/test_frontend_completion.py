"""Usage and text of a completion when a worker coalesces several tokens into one delta."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.protocol import SamplingParams
from frontend.completion import CompletionRun
from frontend.metrics import FrontendMetrics
from frontend.orchestrator import TokenEvent
from frontend.preprocess import ChatTokenizer


@pytest.fixture(scope="module")
def tok(tiny_qwen_dir: Path) -> ChatTokenizer:
    return ChatTokenizer(tiny_qwen_dir)


def _run(tok: ChatTokenizer, stops: tuple[str, ...]) -> CompletionRun:
    # Only the token-event path is exercised: no orchestrator is started.
    return CompletionRun(None, tok, FrontendMetrics(), "r1", "m", None,  # type: ignore[arg-type]
                         SamplingParams(), stops)


def _ids(tok: ChatTokenizer, text: str) -> list[int]:
    return tok.encode(text)


def test_tokens_after_a_stop_string_in_one_delta_are_not_shown_or_counted(tok: ChatTokenizer) -> None:
    before, after = _ids(tok, "a red circle"), _ids(tok, ". more words here")
    run = _run(tok, stops=(".",))
    piece = run._on_event(TokenEvent(tuple(before + after), prompt_tokens=7))
    assert piece is not None and piece.finish_reason == "stop"
    assert piece.text == "a red circle"
    assert run.stats.completion_tokens == len(before) + 1  # the token that completed the stop
    assert run.stats.prompt_tokens == 7


def test_one_delta_or_many_give_the_same_text_and_usage(tok: ChatTokenizer) -> None:
    ids = _ids(tok, "a blue square on a white background")
    one = _run(tok, stops=())
    whole = one._on_event(TokenEvent(tuple(ids), finish_reason="length", prompt_tokens=3))
    many = _run(tok, stops=())
    texts = [many._on_event(TokenEvent((t,), finish_reason="length" if i == len(ids) - 1 else None))
             for i, t in enumerate(ids)]
    assert whole is not None and whole.text == "".join(p.text for p in texts if p is not None)
    assert one.stats.completion_tokens == many.stats.completion_tokens == len(ids)
