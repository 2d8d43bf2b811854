"""Stop sequences: a generation ends where its text first contains one of them, the
sequence itself left out (OpenAI's `stop`).

Text arrives token by token, and a stop sequence may span tokens: the matcher holds back
the end of the text that could still be the start of a stop sequence (at most the
longest one's length - 1 characters), and lets it go once it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Fed:
    """What one piece of text gave: the text that may go out now, and whether a stop
    sequence was met (then nothing after `text` ever goes out)."""

    text: str
    stopped: bool = False


class StopMatcher:
    """Finds the first stop sequence in text fed piece by piece."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> Fed:
        """Adds `piece`; returns the text now known to come before any stop sequence.

        The generation stops at the stop sequence that starts first in the text (as in
        the whole text at once): one found is acted on only once no stop sequence that
        would start before it can still be completed by text to come.
        """
        if self.stopped:
            return Fed("", stopped=True)
        if not self._stops:
            return Fed(piece)
        text = self._held + piece
        found = self._first(text)
        pending = self._pending(text)
        if found is not None and (pending is None or found <= pending):
            self.stopped = True
            self._held = ""
            return Fed(text[:found], stopped=True)
        # hold from where a stop sequence still to come could start
        keep_from = len(text) if pending is None else pending
        self._held = text[keep_from:]
        return Fed(text[:keep_from])

    def flush(self) -> str:
        """The text held back, once the generation ended: up to the first stop sequence
        it holds (then `stopped`), or all of it."""
        held, self._held = self._held, ""
        if self.stopped:
            return ""
        found = self._first(held)
        if found is not None:
            self.stopped = True
            return held[:found]
        return held

    def _first(self, text: str) -> int | None:
        """Where the first stop sequence in `text` starts, if any does."""
        found = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _pending(self, text: str) -> int | None:
        """The first place in `text` from which its end is a proper prefix of a stop
        sequence (one that text to come could complete), if any is."""
        for start in range(max(0, len(text) - self._longest + 1), len(text)):
            tail = text[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self._stops):
                return start
        return None
