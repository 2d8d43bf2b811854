"""The fault proxy's arithmetic (`tests.faultproxy`): read sizes, delays, addresses."""

from __future__ import annotations

import pytest

from tests.faultproxy import (
    CHUNK,
    Bandwidth,
    Blackhole,
    Latency,
    Reset,
    SlowClose,
    forward_delay,
    parse_address,
    read_size,
)


def test_latency_delays_each_chunk_by_its_ms_whatever_its_size():
    assert forward_delay(Latency(ms=200), 1) == pytest.approx(0.2)
    assert forward_delay(Latency(ms=200), CHUNK) == pytest.approx(0.2)


def test_bandwidth_paces_each_chunk_by_its_size():
    limit = Bandwidth(bytes_per_s=10_000)
    assert read_size(limit) == 1_000
    assert forward_delay(limit, 1_000) == pytest.approx(0.1)
    assert forward_delay(limit, 500) == pytest.approx(0.05)


def test_bandwidth_reads_at_least_a_byte_and_at_most_a_chunk():
    assert read_size(Bandwidth(bytes_per_s=1)) == 1
    assert read_size(Bandwidth(bytes_per_s=10**9)) == CHUNK
    with pytest.raises(ValueError):
        Bandwidth(bytes_per_s=0)


@pytest.mark.parametrize("toxic", [None, Reset(), Blackhole(), SlowClose(ms=500)])
def test_other_toxics_forward_without_delay(toxic):
    assert read_size(toxic) == CHUNK
    assert forward_delay(toxic, 100) == 0.0


def test_addresses():
    assert parse_address("127.0.0.1:5432") == ("127.0.0.1", 5432)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("localhost", "host:port", ""):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_each_toxic_has_a_name_for_its_count():
    names = {t.name for t in (Latency(1), Reset(), Blackhole(), SlowClose(1), Bandwidth(1))}
    assert names == {"latency", "reset", "blackhole", "slow_close", "bandwidth"}
