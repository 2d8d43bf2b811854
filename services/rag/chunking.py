"""Splitting a document into overlapping chunks of about N tokens.

Chunks are windows over the document's tokens (the runtime's shared estimate): each
holds `chunk_tokens` tokens, consecutive chunks share `overlap_tokens`, and a chunk's
text is the exact slice of the document from its first token to its last, so
`text[start_char:end_char]` of the original document is the chunk and citations can
point back into it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from services.runtime import token_spans

MIN_CHUNK_TOKENS = 16
MAX_CHUNK_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    start_char: int
    """Start in the document, in code points, inclusive."""
    end_char: int
    """End in the document, in code points, exclusive."""
    text: str
    tokens: int


def chunk_text(text: str, *, chunk_tokens: int, overlap_tokens: int) -> Iterator[Chunk]:
    """The chunks of `text`, in order; none for a text without tokens.

    Raises:
        ValueError: sizes out of range (the service validates them first).
    """
    if not MIN_CHUNK_TOKENS <= chunk_tokens <= MAX_CHUNK_TOKENS:
        raise ValueError(f"chunk_tokens must be {MIN_CHUNK_TOKENS}..{MAX_CHUNK_TOKENS}")
    if not 0 <= overlap_tokens <= chunk_tokens // 2:
        raise ValueError("overlap_tokens must be 0..chunk_tokens/2")
    spans = list(token_spans(text))
    step = chunk_tokens - overlap_tokens
    index = 0
    for first in range(0, len(spans), step):
        window = spans[first : first + chunk_tokens]
        start, end = window[0][0], window[-1][1]
        yield Chunk(index, start, end, text[start:end], len(window))
        index += 1
        if first + chunk_tokens >= len(spans):
            break
