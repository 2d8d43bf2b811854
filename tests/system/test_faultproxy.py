"""The fault proxy (`tests.faultproxy`) in front of a loopback echo server: each toxic
does observably what it says, `clear` restores plain forwarding, and a stopped proxy
holds no socket."""

from __future__ import annotations

import asyncio
import contextlib
import time

import psutil
import pytest

from tests.faultproxy import Bandwidth, Blackhole, FaultProxy, Latency, Reset, SlowClose
from tests.polling import eventually

MESSAGE = b"ping\n"


@pytest.fixture
async def echo():
    """An echo server on loopback; a line `bye` is answered, then the server closes."""
    connections: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
                if data.endswith(b"bye\n"):
                    break
        except ConnectionError:
            pass
        finally:
            connections.discard(writer)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in list(connections):
            writer.transport.abort()
        await server.wait_closed()


@pytest.fixture
async def proxy(echo):
    async with FaultProxy(echo) as proxy:
        yield proxy


@contextlib.asynccontextmanager
async def client(proxy: FaultProxy):
    host, _, port = proxy.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the peer closed the connection (a FIN, or a RST where data it had not
    read was still queued: Linux resets rather than drop it silently)."""
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionResetError:
        return True


async def round_trip(reader, writer, data: bytes = MESSAGE, timeout: float = 5.0) -> float:
    started = time.monotonic()
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(data)), timeout)
    assert got == data
    return time.monotonic() - started


async def test_it_forwards_both_ways(proxy):
    async with client(proxy) as (reader, writer):
        assert await round_trip(reader, writer) < 0.5
    assert proxy.faults_injected == 0


async def test_latency_delays_each_direction_of_open_and_new_connections(proxy):
    async with client(proxy) as (reader, writer):
        await round_trip(reader, writer)
        proxy.set(Latency(ms=150))
        assert await round_trip(reader, writer) >= 0.3  # 150 ms there, 150 ms back
        async with client(proxy) as (reader2, writer2):
            assert await round_trip(reader2, writer2) >= 0.3
        proxy.clear()
        assert await round_trip(reader, writer) < 0.15
    assert proxy.injected["latency"] >= 4


async def test_blackhole_answers_nothing_and_clear_restores(proxy):
    async with client(proxy) as (reader, writer):
        await round_trip(reader, writer)
        proxy.set(Blackhole())
        writer.write(MESSAGE)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)
        async with client(proxy) as (reader2, writer2):  # accepted, never answered
            with pytest.raises(TimeoutError):
                await round_trip(reader2, writer2, timeout=0.5)
        proxy.clear()
        # the open connection delivers what it held, as after a healed partition
        assert await asyncio.wait_for(reader.readexactly(len(MESSAGE)), 5) == MESSAGE
    async with client(proxy) as (reader, writer):
        assert await round_trip(reader, writer) < 0.5
    assert proxy.injected["blackhole"] >= 2


async def test_reset_resets_open_and_new_connections(proxy):
    async with client(proxy) as (reader, writer):
        await round_trip(reader, writer)
        proxy.set(Reset())
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
    async with client(proxy) as (reader, writer):
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
    proxy.clear()
    async with client(proxy) as (reader, writer):
        assert await round_trip(reader, writer) < 0.5
    assert proxy.injected["reset"] == 2
    await eventually(lambda: proxy.connections == 0, what="reset links forgotten")


async def test_slow_close_delays_the_downstream_close(proxy):
    proxy.set(SlowClose(ms=600))
    async with client(proxy) as (reader, writer):
        await round_trip(reader, writer, b"bye\n")  # the echo server closes after it
        answered = time.monotonic()
        assert await asyncio.wait_for(reader.read(1), 5) == b""
        assert time.monotonic() - answered >= 0.5
    proxy.clear()
    async with client(proxy) as (reader, writer):
        await round_trip(reader, writer, b"bye\n")
        answered = time.monotonic()
        assert await asyncio.wait_for(reader.read(1), 5) == b""
        assert time.monotonic() - answered < 0.3
    assert proxy.injected["slow_close"] == 1


async def test_bandwidth_bounds_throughput(proxy):
    rate, size = 40_000, 20_000
    proxy.set(Bandwidth(bytes_per_s=rate))
    async with client(proxy) as (reader, writer):
        took = await round_trip(reader, writer, b"x" * size, timeout=10)
    # each direction forwards at most `rate` (a pipelined round trip: at least one
    # direction's worth of time, less the first slice's)
    assert took >= size / rate * 0.8, took
    proxy.clear()
    async with client(proxy) as (reader, writer):
        assert await round_trip(reader, writer, b"x" * size) < size / rate / 2
    assert proxy.injected["bandwidth"] >= size // (rate // 10)


async def test_a_stopped_proxy_closes_every_socket_it_opened(echo):
    me = psutil.Process()
    before = me.num_fds()
    proxy = await FaultProxy(echo).start()
    host, _, port = proxy.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    await round_trip(reader, writer)
    proxy.set(Blackhole())
    reader2, writer2 = await asyncio.open_connection(host, int(port))
    writer2.write(MESSAGE)
    await eventually(lambda: proxy.accepted == 2, what="second connection accepted")
    await proxy.shutdown()
    await proxy.shutdown()  # idempotent
    assert await closed(reader)
    assert await closed(reader2)
    writer.transport.abort()
    writer2.transport.abort()
    # the proxy's listening, downstream and upstream sockets are gone; the echo
    # server closes its side of the upstream connection once it sees it closed
    await eventually(lambda: me.num_fds() <= before, what="every socket closed")
