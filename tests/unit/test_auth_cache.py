"""The key store's verification cache on a fake clock: fresh answers for the ttl, known
keys through a database outage for the stale grace, and nothing else (fail closed)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from services.auth import KeyStore
from services.auth.cache import VerificationCache
from services.auth.store import Caller
from services.runtime import Principal, Unavailable
from tests.fakes import Clock

KEY = "sb_0123456789abcdef_secret"
ACME = Caller(Principal.TENANT, "acme")


class Database:
    """What `_lookup` would read: who each key is, or an outage."""

    def __init__(self) -> None:
        self.keys: dict[str, Caller] = {KEY: ACME}
        self.down = False
        self.reads = 0

    async def lookup(self, token: str) -> Caller | None:
        if self.down:
            raise Unavailable("the key store is unavailable", reason="DEPENDENCY_UNAVAILABLE")
        self.reads += 1
        return self.keys.get(token)


@pytest.fixture
def world():
    clock, database = Clock(), Database()
    store = KeyStore(
        "postgresql://unused",  # the pool is never opened
        cache_ttl=timedelta(seconds=30),
        stale_grace=timedelta(minutes=10),
        clock=clock,
    )
    store._lookup = database.lookup  # type: ignore[method-assign]
    return store, clock, database


async def test_a_fresh_answer_is_not_read_again_and_a_stale_one_is(world):
    store, clock, database = world
    assert await store.verify(KEY) == ACME
    clock.advance(29)
    assert await store.verify(KEY) == ACME
    assert database.reads == 1
    del database.keys[KEY]  # revoked: seen once the answer is 30 s old
    clock.advance(1)
    assert await store.verify(KEY) is None
    assert database.reads == 2


async def test_a_known_key_keeps_working_through_an_outage_for_the_grace(world):
    store, clock, database = world
    assert await store.verify(KEY) == ACME
    database.down = True
    clock.advance(9 * 60)
    assert await store.verify(KEY) == ACME
    clock.advance(60)  # read 10 minutes ago: too old to vouch for the key
    with pytest.raises(Unavailable):
        await store.verify(KEY)
    database.down = False
    assert await store.verify(KEY) == ACME


async def test_an_outage_never_lets_an_unknown_or_refused_key_in(world):
    store, clock, database = world
    assert await store.verify("sb_ffffffffffffffff_guess") is None
    database.down = True
    clock.advance(60)
    assert await store.verify("sb_ffffffffffffffff_guess") is None  # still refused
    with pytest.raises(Unavailable):
        await store.verify("sb_eeeeeeeeeeeeeeee_never_seen")


def test_the_cache_is_bounded_and_the_grace_covers_the_ttl():
    cache: VerificationCache[str] = VerificationCache(ttl=1, stale_grace=5, size=2)
    for i, slot in enumerate((b"a", b"b", b"c")):
        cache.put(slot, slot.decode(), now=i)
    assert len(cache) == 2 and cache.stale(b"a", now=3) is None
    assert cache.fresh(b"c", now=2.5).value == "c"  # type: ignore[union-attr]
    assert cache.fresh(b"c", now=3) is None and cache.stale(b"c", now=3) is not None
    with pytest.raises(ValueError):
        VerificationCache(ttl=5, stale_grace=1)


async def test_a_stalled_database_is_down_to_the_check(world, monkeypatch):
    """A lookup that does not answer within LOOKUP_TIMEOUT_S (below Envoy's wait for the
    check) is an outage: a known key is answered from its verification, any other is
    UNAVAILABLE, never a check left hanging."""
    store, clock, database = world
    monkeypatch.setattr("services.auth.store.LOOKUP_TIMEOUT_S", 0.01)
    assert await store.verify(KEY) == ACME
    clock.advance(31)  # no longer fresh

    async def stalled(token: str) -> Caller | None:
        await asyncio.Event().wait()  # never answers
        raise AssertionError("unreachable")

    store._lookup = stalled  # type: ignore[method-assign]
    assert await store.verify(KEY) == ACME
    with pytest.raises(Unavailable) as raised:
        await store.verify("sb_eeeeeeeeeeeeeeee_never_seen")
    assert raised.value.reason == "DEPENDENCY_UNAVAILABLE"
    assert raised.value.retry_after is not None
    # one read per key, however many checks wait: the stalled reads are still there
    assert len(store._lookups) == 2
    for lookup in store._lookups.values():
        lookup.cancel()


async def test_a_late_answer_is_cached_and_checks_of_one_key_share_one_read(world, monkeypatch):
    store, clock, database = world
    monkeypatch.setattr("services.auth.store.LOOKUP_TIMEOUT_S", 0.01)
    assert await store.verify(KEY) == ACME
    clock.advance(31)
    answer = asyncio.Event()
    reads = 0

    async def slow(token: str) -> Caller | None:
        nonlocal reads
        reads += 1
        await answer.wait()
        return ACME

    store._lookup = slow  # type: ignore[method-assign]
    assert await asyncio.gather(store.verify(KEY), store.verify(KEY)) == [ACME, ACME]
    assert reads == 1  # from the stale verification meanwhile
    (lookup,) = store._lookups.values()
    answer.set()
    await lookup
    assert not store._lookups
    assert await store.verify(KEY) == ACME  # fresh again: no read
    assert reads == 1
