"""Incremental detokenization and stop-string matching for streamed output.

A byte-level BPE token can end in the middle of a UTF-8 character, so decoding token by token
would emit U+FFFD garbage. ``IncrementalDetokenizer`` decodes a short window of recent
tokens (the last emitted ones give the left context that leading-space rules need) and holds text
back while it ends in an incomplete character; the pieces it emits concatenate to
``tokenizer.decode(all_ids, skip_special_tokens=True)``.

``StopMatcher`` holds back any tail of the text that could still grow into a stop string, so a stop
string split across tokens is caught and never partly sent.
"""

from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Feed token ids, get back only new, complete text."""

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this are already emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=self._skip)

    def add(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete ('' while a character is still partial)."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""
        new_text = full_text[len(prefix_text):]
        # The emitted tokens become the next window's left context.
        self._prefix, self._read = self._read, len(self._ids)
        return new_text

    def flush(self) -> str:
        """At the end of the output: whatever is still held back, as the full decode renders it."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text):]

    @property
    def num_tokens(self) -> int:
        return len(self._ids)


class StopMatcher:
    """Find stop strings in streamed text; text up to (not including) a stop string is released."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""  # text not yet released
        self.stopped = False

    def add(self, text: str) -> str:
        """Add text; return what can be released now. Sets ``stopped`` when a stop string is seen."""
        if self.stopped:
            return ""
        self._pending += text
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = self._partial_tail()
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(out):]
        return out

    def flush(self) -> str:
        """Release the held-back tail (the output ended without completing a stop string)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_tail(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
