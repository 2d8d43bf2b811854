"""settle_heap: what is alive at start is frozen, and the young generation is collected
less often, but still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from services.runtime import settle_heap
from services.runtime._heap import OLDER_THRESHOLDS, YOUNG_THRESHOLD


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_the_heap_alive_at_start_is_frozen_and_the_thresholds_raised(restored_gc: None) -> None:
    started = [_Node() for _ in range(100)]  # a service's start-up objects
    assert _scanned(started[0])
    settle_heap()
    # frozen: in no generation the collector scans any more
    assert not any(_scanned(node) for node in started)
    assert gc.get_threshold() == (YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    made_after = _Node()
    assert _scanned(made_after)


def _scanned(obj: object) -> bool:
    """Whether `obj` is in one of the generations the collector scans."""
    return any(o is obj for generation in range(3) for o in gc.get_objects(generation))


def test_cycles_made_after_start_are_still_freed(restored_gc: None) -> None:
    settle_heap()
    freed: list[int] = []
    for i in range(3):
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a cycle reference counting cannot free
        weakref.finalize(a, freed.append, i)
        del a, b
    assert gc.isenabled()
    gc.collect()
    assert freed == [0, 1, 2]
