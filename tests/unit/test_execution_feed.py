"""WatchTask's fan-out (`feed.EventFeed`): one history read per watched task, joined to
the live events without a gap or a duplicate; watchers independent of each other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

import pytest

from services.execution.feed import EventFeed, History
from services.runtime import Unavailable


class Stream:
    """A stream of several tasks' events with stream sequences; a history read waits
    for `release` so that tests decide what arrives live meanwhile."""

    def __init__(self) -> None:
        self.sequence = 0
        self.stored: list[tuple[int, str, bytes]] = []
        self.reads: list[str] = []
        self.release = asyncio.Event()
        self.release.set()
        self.error: BaseException | None = None

    def store(self, task_id: str, data: bytes) -> tuple[int, bytes]:
        self.sequence += 1
        self.stored.append((self.sequence, task_id, data))
        return self.sequence, data

    async def read_history(self, task_id: str) -> History:
        self.reads.append(task_id)
        snapshot = [(s, d) for s, t, d in self.stored if t == task_id]
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return snapshot


def publish(feed: EventFeed, stream: Stream, task_id: str, data: bytes) -> None:
    """Stores an event and hands it to the live feed, as JetStream and `tail` do."""
    sequence, data = stream.store(task_id, data)
    feed.deliver(task_id, sequence, data)


async def take(events: AsyncGenerator[bytes], count: int) -> list[bytes]:
    """The first `count` events; the watch ends after them (as WatchTask's does)."""
    got = []
    async with aclosing(events):
        async for data in events:
            got.append(data)
            if len(got) == count:
                break
    return got


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_watchers_of_a_task_share_one_history_read_then_get_live_events():
    stream = Stream()
    feed = EventFeed(stream.read_history)
    for i in range(3):
        stream.store("t", f"old{i}".encode())
    stream.store("other", b"x")
    watchers = [asyncio.create_task(take(feed.events("t"), 6)) for _ in range(50)]
    await settle()
    for i in range(3):
        publish(feed, stream, "t", f"new{i}".encode())
        publish(feed, stream, "other", b"y")
    results = await asyncio.gather(*watchers)
    assert results == [[b"old0", b"old1", b"old2", b"new0", b"new1", b"new2"]] * 50
    assert stream.reads == ["t"]
    assert feed.watched == 0


async def test_live_events_during_the_history_read_join_it_without_gap_or_duplicate():
    stream = Stream()
    feed = EventFeed(stream.read_history)
    stream.store("t", b"e1")  # before anyone watched: in the history only
    late = stream.store("t", b"e2")  # in the history, and delivered live during the read
    stream.release.clear()
    watcher = asyncio.create_task(take(feed.events("t"), 4))
    await settle()
    assert stream.reads == ["t"]  # the read has its snapshot
    feed.deliver("t", *late)
    publish(feed, stream, "t", b"e3")  # after the snapshot: live only
    stream.release.set()
    await settle()
    publish(feed, stream, "t", b"e4")
    assert await watcher == [b"e1", b"e2", b"e3", b"e4"]


async def test_an_event_stored_before_the_read_but_delivered_live_late_is_not_repeated():
    stream = Stream()
    feed = EventFeed(stream.read_history)
    stream.release.clear()
    watcher = asyncio.create_task(take(feed.events("t"), 3))
    await settle()
    late = stream.store("t", b"e1")  # in the history; its live copy comes after the read
    stream.reads.clear()
    stream.release.set()
    await settle()
    feed.deliver("t", *late)
    publish(feed, stream, "t", b"e2")
    publish(feed, stream, "t", b"e3")
    assert await watcher == [b"e1", b"e2", b"e3"]


async def test_a_slow_watcher_holds_no_one_back():
    stream = Stream()
    feed = EventFeed(stream.read_history)
    stream.store("t", b"e0")
    slow = feed.events("t")
    assert await anext(slow) == b"e0"
    fast = asyncio.create_task(take(feed.events("t"), 1001))
    await settle()
    for i in range(1, 1001):
        publish(feed, stream, "t", f"e{i}".encode())  # never waits
    assert len(await fast) == 1001
    # the slow one, reading only now, still gets every event in order
    assert await take(slow, 1000) == [f"e{i}".encode() for i in range(1, 1001)]
    assert feed.watched == 0


async def test_the_last_watcher_leaving_drops_the_topic_and_its_read():
    stream = Stream()
    feed = EventFeed(stream.read_history)
    stream.release.clear()
    watcher = asyncio.create_task(take(feed.events("t"), 1))
    await settle()
    assert feed.watched == 1
    watcher.cancel()
    await settle()
    assert feed.watched == 0
    publish(feed, stream, "t", b"e1")  # no one watches: dropped
    stream.release.set()
    assert await take(feed.events("t"), 1) == [b"e1"]  # a new watcher reads afresh
    assert stream.reads == ["t", "t"]


async def test_a_failed_history_read_fails_its_watchers_and_the_next_one_reads_again():
    stream = Stream()
    feed = EventFeed(stream.read_history)
    stream.store("t", b"e1")
    stream.error = Unavailable("down", reason="DEPENDENCY_UNAVAILABLE")
    watchers = [asyncio.create_task(take(feed.events("t"), 1)) for _ in range(3)]
    results = await asyncio.gather(*watchers, return_exceptions=True)
    assert all(r is stream.error for r in results)
    assert feed.watched == 0
    stream.error = None
    assert await take(feed.events("t"), 1) == [b"e1"]
    assert stream.reads == ["t", "t"]


async def test_fail_all_ends_every_watch_and_unavailable_refuses_new_ones():
    stream = Stream()
    feed = EventFeed(stream.read_history)
    stream.store("a", b"a1")
    stream.store("b", b"b1")
    watchers = [asyncio.create_task(take(feed.events(t), 2)) for t in ("a", "b")]
    await settle()
    error = Unavailable("lost", reason="DEPENDENCY_UNAVAILABLE")
    feed.unavailable = error
    feed.fail_all(error)
    assert [r is error for r in await asyncio.gather(*watchers, return_exceptions=True)] == [
        True,
        True,
    ]
    assert feed.watched == 0
    with pytest.raises(Unavailable):
        await anext(feed.events("a"))
    feed.unavailable = None
    assert await take(feed.events("a"), 1) == [b"a1"]
