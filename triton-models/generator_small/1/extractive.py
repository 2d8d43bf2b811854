"""Extractive answering: split passages into sentences, score them against a prompt, and
plan the token stream of an answer.

This is the honest "generator" behind `generator_small` and `generator_large`: no language
model writes anything. The answer is made of sentences copied from the supplied passages,
each token tagged with the index of the passage it came from (the citation).

- lexical scoring (small tier): BM25 over sentences.
- semantic scoring (large tier): cosine similarity of MiniLM embeddings (computed by the
  caller through the `embedder` model) of each sentence and of its context window (the
  sentence with the one before it), blended with BM25, and a maximal-marginal-relevance
  pick so the chosen sentences do not repeat each other.

Pure Python + numpy, no Triton import: unit tests import it directly. Both tiers share this
file (generator_large/1/extractive.py is a symlink to this one).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NO_CONTEXT_ANSWER = (
    "This demo model answers only from supplied passages, and none were given: it is an "
    "extractive model, not a language model."
)
NO_MATCH_ANSWER = "None of the supplied passages appears to answer this question."
NO_PASSAGE = -1

_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?…])|(?<=[.!?…][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])"  # end mark, space, capital
    r"|\n\s*\n"  # blank line
    r"|\n(?=\s*[-*•]\s)"  # bullet line
)
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?", re.UNICODE)
_STREAM_TOKEN = re.compile(r"\S+\s*")

# Small English stop-word list: enough to keep "the/of/is" from dominating overlap scores.
STOP_WORDS = frozenset(
    """a an and are as at be been but by can could did do does for from had has have how i if
    in into is it its me my no not of on or our so such than that the their them then there
    these they this those to was we were what when where which who whom why will with would
    you your""".split()
)


@dataclass(frozen=True, slots=True)
class Sentence:
    """One sentence of the context, with the passage it belongs to."""

    text: str
    passage: int


@dataclass(frozen=True, slots=True)
class Token:
    """One streamed token: a word with its trailing whitespace, and its passage (or -1)."""

    text: str
    passage: int


def split_sentences(text: str) -> list[str]:
    """Split a passage into sentences on ., !, ? (followed by a capital or digit), blank lines
    and bullet lines. Whitespace inside a sentence is collapsed."""
    parts = _SENTENCE_END.split(text.strip())
    return [s for s in (" ".join(p.split()) for p in parts if p) if s]


def sentences_of(passages: Sequence[str]) -> list[Sentence]:
    """All sentences of all passages, in order, each tagged with its passage index."""
    return [
        Sentence(text=s, passage=i)
        for i, passage in enumerate(passages)
        for s in split_sentences(passage)
    ]


def terms(text: str) -> list[str]:
    """Lower-cased word terms without stop words, with a light plural/suffix folding."""
    out = []
    for word in _WORD.findall(text.lower()):
        if word in STOP_WORDS:
            continue
        out.append(_stem(word))
    return out


def _stem(word: str) -> str:
    if word.endswith(("'s", "’s")):
        word = word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and word[-2] not in "siu":  # not glass/paris/bus
        return word[:-1]
    return word


def bm25_scores(
    query: Sequence[str], docs: Sequence[Sequence[str]], *, k1: float = 1.2, b: float = 0.75
) -> list[float]:
    """BM25 score of each doc (a list of terms) for the query terms; IDF over `docs`."""
    n = len(docs)
    if n == 0:
        return []
    avg_len = sum(len(d) for d in docs) / n or 1.0
    df: Counter[str] = Counter()
    for d in docs:
        df.update(set(d))
    q_terms = set(query)
    scores = []
    for d in docs:
        tf = Counter(d)
        norm = k1 * (1 - b + b * len(d) / avg_len)
        score = 0.0
        for t in q_terms:
            f = tf.get(t, 0)
            if f:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                score += idf * f * (k1 + 1) / (f + norm)
        scores.append(score)
    return scores


def rank_lexical(
    prompt: str, sentences: Sequence[Sentence], *, top_k: int, min_ratio: float = 0.5
) -> list[int]:
    """Indices of the best `top_k` sentences by BM25, best first (ties keep document order).

    Sentences sharing no term with the prompt, or scoring below `min_ratio` times the best
    score, are never picked.
    """
    scores = bm25_scores(terms(prompt), [terms(s.text) for s in sentences])
    if not scores or max(scores) <= 0:
        return []
    floor = max(scores) * min_ratio
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [i for i in order[:top_k] if scores[i] > 0 and scores[i] >= floor]


def context_windows(sentences: Sequence[Sentence]) -> list[str | None]:
    """For each sentence, the previous sentence of the same passage followed by it (None
    for a passage's first sentence). Embedding this window resolves pronouns ("It is 330
    metres tall.") that the sentence alone leaves unanchored."""
    return [
        f"{sentences[i - 1].text} {s.text}"
        if i > 0 and sentences[i - 1].passage == s.passage
        else None
        for i, s in enumerate(sentences)
    ]


def rank_semantic(
    prompt_vec: np.ndarray,
    sentence_vecs: np.ndarray,
    *,
    window_vecs: np.ndarray | None = None,
    lexical: Sequence[float] = (),
    top_k: int,
    min_similarity: float,
    min_ratio: float = 0.75,
    lexical_weight: float = 0.1,
    diversity: float = 0.3,
    max_redundancy: float = 0.9,
) -> list[int]:
    """Indices of up to `top_k` sentences, best first, picked by maximal marginal relevance.

    Similarity is the cosine of L2-normalised embeddings: the mean of the sentence's own and
    of its context window's (`window_vecs`, rows of the sentence itself where it has no
    window). Sentences below `min_similarity`, or below `min_ratio` times the best
    similarity, are never picked. The ranking blends in BM25 normalised to [0, 1]
    (`lexical_weight`), and each further pick is penalised by its highest similarity to a
    sentence already picked (`diversity`); a sentence at least `max_redundancy` similar to
    one already picked is a near-duplicate and is dropped.
    """
    n = len(sentence_vecs)
    if n == 0:
        return []
    similarity = sentence_vecs @ prompt_vec
    if window_vecs is not None:
        similarity = (similarity + window_vecs @ prompt_vec) / 2
    lex = np.asarray(lexical, dtype=np.float32)
    if lex.size != n or lex.max() <= 0:
        lex = np.zeros(n, dtype=np.float32)
    else:
        lex = lex / lex.max()
    relevance = (1 - lexical_weight) * similarity + lexical_weight * lex
    floor = max(min_similarity, float(similarity.max()) * min_ratio)
    candidates = [i for i in range(n) if similarity[i] >= floor]
    picked: list[int] = []
    while candidates and len(picked) < top_k:
        if picked:
            redundancy = (sentence_vecs[candidates] @ sentence_vecs[picked].T).max(axis=1)
        else:
            redundancy = np.zeros(len(candidates), dtype=np.float32)
        keep = redundancy < max_redundancy
        candidates = [c for c, k in zip(candidates, keep, strict=True) if k]
        if not candidates:
            break
        mmr = relevance[candidates] - diversity * redundancy[keep]
        best = candidates[int(np.argmax(mmr))]
        picked.append(best)
        candidates.remove(best)
    return picked


def stream_tokens(text: str, passage: int) -> list[Token]:
    """Word-level tokens, each keeping its trailing whitespace, so that joining them gives
    back the text."""
    return [Token(t, passage) for t in _STREAM_TOKEN.findall(text)]


def plan_answer(sentences: Sequence[Sentence]) -> list[Token]:
    """Tokens of the answer: the sentences in the given order, separated by one space."""
    tokens: list[Token] = []
    for i, s in enumerate(sentences):
        text = s.text if i == len(sentences) - 1 else s.text + " "
        tokens.extend(stream_tokens(text, s.passage))
    return tokens


def fixed_answer(text: str) -> list[Token]:
    """Tokens of a sentence that does not come from any passage."""
    return stream_tokens(text, NO_PASSAGE)
