"""WatchTask's fan-out: every watcher of a task reads one shared copy of its events.

The API process reads the event stream live once, for every task (`tail`), and hands
each event to the `Topic` of its task if anyone watches it; nothing is read for a task
no one watches. A topic is made by the first watcher of its task and dropped with the
last one. It holds the task's events in order: the history read back from the stream
once (bounded reads, `tail`), then the live events after it. Each watcher is a cursor
into that list, so a slow watcher holds no one back and costs no buffer of its own
(gRPC's flow control paces it alone), and a thousand watchers of a task cost one read.

Joining the history to the live events without a gap or a duplicate rests on this
order: a topic is registered (and so receives live events) before its history is read,
so every event missing from the history arrives live; live events that arrive while the
history is read are kept aside, and those the history already holds (a stream sequence
not above its last one) are dropped. The live feed delivers each event once, in stream
order, from its start (`tail` resumes it after a NATS restart from where it stopped).

A topic holds no more than its task's own events: at most a few thousand (100 steps,
each queued and attempted at most 10 times), each a few kilobytes at most.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

logger = logging.getLogger(__name__)

__all__ = ["EventFeed", "History", "ReadHistory"]

History = Sequence[tuple[int, bytes]]
"""A task's retained events, oldest first: (stream sequence, serialised event)."""
ReadHistory = Callable[[str], Awaitable[History]]


class Topic:
    """One watched task: its events in order, read by its watchers at their own pace."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.events: list[bytes] = []
        self.last_sequence = 0
        """Stream sequence of the last event in `events`: live events up to it are dropped."""
        self.early: list[tuple[int, bytes]] | None = []
        """Live events that arrived while the history was read (None once it was)."""
        self.error: BaseException | None = None
        self.watchers = 0
        self.loading: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def extend(self, events: History) -> None:
        for sequence, data in events:
            if sequence > self.last_sequence:
                self.events.append(data)
                self.last_sequence = sequence
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()

    async def changed(self) -> None:
        """Returns once an event was added or the topic failed."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class EventFeed:
    """The live events of every watched task, fanned out to their watchers.

    Args:
        read_history: reads a task's retained events; raises the error its watchers
            get (a `SwitchboardError`).
    """

    def __init__(self, read_history: ReadHistory) -> None:
        self._read_history = read_history
        self._topics: dict[str, Topic] = {}
        self.unavailable: BaseException | None = None
        """Set while the live feed is down for longer than its grace: watches are refused."""

    @property
    def watched(self) -> int:
        """How many tasks have watchers."""
        return len(self._topics)

    def deliver(self, task_id: str, sequence: int, data: bytes) -> None:
        """Hands a live event (stream sequence `sequence`) to its task's watchers, if any.
        Never waits."""
        topic = self._topics.get(task_id)
        if topic is None:
            return
        if topic.early is not None:
            topic.early.append((sequence, data))
        else:
            topic.extend(((sequence, data),))

    def fail_all(self, error: BaseException) -> None:
        """Ends every watch with `error` (the live feed lost events or stays down); later
        watches read their histories afresh."""
        topics, self._topics = self._topics, {}
        for topic in topics.values():
            if topic.loading is not None:
                topic.loading.cancel()
            topic.fail(error)

    async def events(self, task_id: str) -> AsyncIterator[bytes]:
        """The task's events (serialised `WatchTaskResponse`s), every retained one in
        order, then new ones as they come; runs until the caller stops reading.

        Raises:
            SwitchboardError: the history cannot be read, or the live feed is down.
        """
        if self.unavailable is not None:
            raise self.unavailable.with_traceback(None)  # one error, raised to many
        topic = self._topics.get(task_id)
        if topic is None:
            topic = self._topics[task_id] = Topic(task_id)
            topic.loading = asyncio.create_task(self._load(topic), name=f"history-{task_id}")
        topic.watchers += 1
        try:
            position = 0
            while True:
                if position < len(topic.events):
                    position += 1
                    yield topic.events[position - 1]
                elif topic.error is not None:
                    raise topic.error.with_traceback(None)
                else:
                    await topic.changed()
        finally:
            topic.watchers -= 1
            if topic.watchers == 0:
                self._drop(topic)

    async def _load(self, topic: Topic) -> None:
        try:
            history = await self._read_history(topic.task_id)
        except Exception as error:  # noqa: BLE001 - every watcher of the topic gets it
            if self._topics.get(topic.task_id) is topic:
                del self._topics[topic.task_id]  # the next watcher reads afresh
            topic.fail(error)
            return
        early, topic.early = topic.early or [], None
        topic.extend(history)
        topic.extend(early)

    def _drop(self, topic: Topic) -> None:
        if self._topics.get(topic.task_id) is topic:
            del self._topics[topic.task_id]
        if topic.loading is not None and not topic.loading.done():
            topic.loading.cancel()
