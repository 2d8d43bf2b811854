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
        """Adds `piece`; returns the text now known to come before any stop sequence."""
        if self.stopped:
            return Fed("", stopped=True)
        if not self._stops:
            return Fed(piece)
        text = self._held + piece
        found = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return Fed(text[: min(found)], stopped=True)
        # keep what could be the start of a stop sequence still to come
        keep = 0
        for size in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                keep = size
                break
        self._held = text[len(text) - keep :]
        return Fed(text[: len(text) - keep])

    def flush(self) -> str:
        """The text held back, once the generation ended without a stop sequence."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
