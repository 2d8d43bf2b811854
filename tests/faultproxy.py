"""A TCP fault proxy on loopback: put it between a service and a dependency, then switch
network faults ("toxics") on and off under live traffic.

    async with FaultProxy("127.0.0.1:5432") as proxy:
        url = f"postgresql://postgres@{proxy.address}/switchboard"
        proxy.set(Latency(ms=200))
        proxy.set(Reset())
        proxy.clear()

A toxic applies to the connections already open and to the new ones, from the next chunk
each reads. Stopping the proxy closes every socket it opened (listening, downstream,
upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

logger = logging.getLogger(__name__)

CHUNK = 65536
"""The most bytes forwarded at once."""
BANDWIDTH_SLICES_PER_S = 10
"""Under a bandwidth limit, reads are cut to a tenth of a second's worth of bytes, so
the pacing is smooth rather than one long sleep per large chunk."""


@dataclass(frozen=True)
class Latency:
    """Every chunk, in each direction, waits `ms` before it is forwarded."""

    ms: float
    name: ClassVar[str] = "latency"


@dataclass(frozen=True)
class Reset:
    """Every open connection is closed at once with a TCP RST (both its sides); a new
    connection is accepted and reset."""

    name: ClassVar[str] = "reset"


@dataclass(frozen=True)
class Blackhole:
    """Nothing is forwarded or answered, nothing is closed: a network partition. An open
    connection holds what it reads (TCP's own buffers then fill, and the sender stalls)
    and delivers it once the toxic is cleared, as retransmission would after a
    partition heals. A connection accepted meanwhile is read and dropped, never reaches
    the upstream, and stays a black hole after `clear` (its peer's timeout ends it)."""

    name: ClassVar[str] = "blackhole"


@dataclass(frozen=True)
class SlowClose:
    """When the upstream closes a connection, the downstream side is closed `ms` later."""

    ms: float
    name: ClassVar[str] = "slow_close"


@dataclass(frozen=True)
class Bandwidth:
    """Each direction of each connection forwards at most `bytes_per_s`."""

    bytes_per_s: int
    name: ClassVar[str] = "bandwidth"

    def __post_init__(self) -> None:
        if self.bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")


Toxic = Latency | Reset | Blackhole | SlowClose | Bandwidth


def read_size(toxic: Toxic | None) -> int:
    """How many bytes to read at once while `toxic` is on."""
    if isinstance(toxic, Bandwidth):
        return max(1, min(CHUNK, toxic.bytes_per_s // BANDWIDTH_SLICES_PER_S))
    return CHUNK


def forward_delay(toxic: Toxic | None, nbytes: int) -> float:
    """Seconds a chunk of `nbytes` waits before it is forwarded while `toxic` is on."""
    if isinstance(toxic, Latency):
        return max(0.0, toxic.ms / 1000.0)
    if isinstance(toxic, Bandwidth):
        return nbytes / toxic.bytes_per_s
    return 0.0


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:port`) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not host:port: {address!r}")
    return host.strip("[]"), int(port)


def _reset_on_close(writer: asyncio.StreamWriter) -> None:
    """SO_LINGER 0: the next close sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Link:
    """One proxied connection: the downstream client's socket and ours to the upstream."""

    def __init__(self, down: asyncio.StreamWriter) -> None:
        self.down = down
        self.up: asyncio.StreamWriter | None = None

    def abort(self, *, reset: bool) -> None:
        for writer in (self.down, self.up):
            if writer is None:
                continue
            if reset:
                _reset_on_close(writer)
            writer.transport.abort()


class FaultProxy:
    """A TCP proxy from `address` (127.0.0.1, a free port) to `upstream` (`host:port`),
    with one switchable toxic at a time."""

    def __init__(self, upstream: str, *, host: str = "127.0.0.1") -> None:
        self.upstream = parse_address(upstream)
        self._host = host
        self._server: asyncio.Server | None = None
        self._toxic: Toxic | None = None
        self._changed = asyncio.Event()
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.injected: Counter[str] = Counter()
        """Faults injected, by toxic: chunks delayed or dropped, connections reset or
        closed late."""
        self.accepted = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, self._host, 0)
        return self

    async def shutdown(self) -> None:
        """Stops listening and closes every connection (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.abort(reset=False)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- the public front ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "the proxy is not running"
        return self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        """Where clients connect instead of the upstream: `127.0.0.1:<port>`."""
        return f"{self._host}:{self.port}"

    @property
    def toxic(self) -> Toxic | None:
        return self._toxic

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return len(self._links)

    @property
    def faults_injected(self) -> int:
        return sum(self.injected.values())

    def set(self, toxic: Toxic) -> None:
        """Switches `toxic` on (replacing the one on); a Reset resets every open
        connection at once."""
        self._toxic = toxic
        if isinstance(toxic, Reset):
            for link in list(self._links):
                self.injected[toxic.name] += 1
                link.abort(reset=True)
        self._wake()

    def clear(self) -> None:
        """No toxic: bytes flow as they come."""
        self._toxic = None
        self._wake()

    # -- the proxying --------------------------------------------------------------------------

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        link = _Link(writer)
        self._links.add(link)
        self.accepted += 1
        try:
            await self._proxy(link, reader)
        except (OSError, asyncio.IncompleteReadError):
            pass  # a side reset or refused: the link is closed below
        except asyncio.CancelledError:
            pass  # the proxy stops
        finally:
            self._links.discard(link)
            link.abort(reset=False)
            self._handlers.discard(task)

    async def _proxy(self, link: _Link, down_reader: asyncio.StreamReader) -> None:
        toxic = self._toxic
        if isinstance(toxic, Reset):
            self.injected[toxic.name] += 1
            link.abort(reset=True)
            return
        if isinstance(toxic, Blackhole):
            self.injected[toxic.name] += 1
            while await down_reader.read(CHUNK):
                pass
            return
        up_reader, link.up = await asyncio.open_connection(*self.upstream)
        upward = asyncio.ensure_future(self._pump(down_reader, link.up))
        downward = asyncio.ensure_future(self._pump(up_reader, link.down))
        try:
            done, _ = await asyncio.wait((upward, downward), return_when=asyncio.FIRST_COMPLETED)
            if downward in done and downward.exception() is None:
                await self._upstream_closed()
        finally:
            for pump in (upward, downward):
                pump.cancel()
            await asyncio.gather(upward, downward, return_exceptions=True)

    async def _upstream_closed(self) -> None:
        """The upstream closed its side: close the downstream one, unless a toxic holds it
        open (a black hole never closes) or late (a slow close)."""
        while isinstance(self._toxic, Blackhole):
            await self._changed.wait()
        toxic = self._toxic
        if isinstance(toxic, SlowClose):
            self.injected[toxic.name] += 1
            await asyncio.sleep(toxic.ms / 1000.0)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Forwards one direction until its end of file, applying the toxic on."""
        while data := await source.read(read_size(self._toxic)):
            if isinstance(self._toxic, Blackhole):
                self.injected[self._toxic.name] += 1
                while isinstance(self._toxic, Blackhole):
                    await self._changed.wait()
            toxic = self._toxic
            delay = forward_delay(toxic, len(data))
            if delay > 0 and toxic is not None:
                self.injected[toxic.name] += 1
                await asyncio.sleep(delay)
            sink.write(data)
            await sink.drain()
