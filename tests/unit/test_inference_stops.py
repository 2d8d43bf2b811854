"""Stop sequences over text that arrives in pieces: whatever the pieces, what goes out
is the text up to the first stop sequence, without it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.inference.stops import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        fed = matcher.feed(piece)
        out.append(fed.text)
        if fed.stopped:
            return "".join(out), True
    rest = matcher.flush()  # a stop sequence in the held text stops it there too
    return "".join(out) + rest, matcher.stopped


def expected(stops: list[str], text: str) -> tuple[str, bool]:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def test_a_stop_sequence_across_tokens_ends_the_text_before_it() -> None:
    assert run(["\n\nUser:"], ["Hello", " there.\n", "\nUs", "er: more"]) == ("Hello there.", True)


def test_text_that_only_looked_like_a_stop_sequence_goes_out_whole() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN").text == "the "  # "EN" might begin END
    assert matcher.feed("D").stopped
    again = StopMatcher(["END"])
    assert again.feed("the EN").text == "the "
    assert again.feed("ds").text == "ENds"  # it did not
    assert again.flush() == ""


def test_without_stop_sequences_every_piece_goes_out_at_once() -> None:
    matcher = StopMatcher([])
    assert [matcher.feed(p).text for p in ("a", "b")] == ["a", "b"]
    assert matcher.flush() == ""


def test_the_earliest_of_several_stop_sequences_wins() -> None:
    assert run(["b", "xyz"], ["axy", "zb"]) == ("a", True)


@given(
    stops=st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=4),
    text=st.text("abc", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=12),
)
def test_any_split_of_the_text_gives_the_same_answer(
    stops: list[str], text: str, cuts: list[int]
) -> None:
    points = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(points, points[1:], strict=False)]
    assert run(stops, pieces) == expected(stops, text)


def test_a_stop_sequence_found_waits_for_a_longer_one_that_would_start_before_it() -> None:
    # "c" is in "ac", but "aca" may start at the "a" before it: only the next piece says
    assert run(["c", "aca"], ["ac", "a"]) == ("", True)
    assert run(["c", "aca"], ["ac", "b"]) == ("a", True)
    # the generation ends with the longer one still possible: the shorter one stops it
    assert run(["c", "aca"], ["ac"]) == ("a", True)
