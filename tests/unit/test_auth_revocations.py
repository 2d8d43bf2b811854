"""How long a read of the revoked keys is trusted (fake clock), and a revoked key's
cached verifications leaving the cache (pure logic; the reads themselves run against
PostgreSQL in tests/integration/test_auth.py)."""

from __future__ import annotations

from services.auth.cache import VerificationCache
from services.auth.revocations import RevocationFeed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_revocations_are_unknown_until_read_then_trusted_for_a_while() -> None:
    clock = Clock()
    feed = RevocationFeed(db=None, clock=clock)  # type: ignore[arg-type]
    assert feed.fresh(30.0) is None
    feed.revoked, feed.read_at = frozenset({"0123456789ab"}), clock.now
    clock.now += 30.0
    assert feed.fresh(30.0) == frozenset({"0123456789ab"})
    clock.now += 0.001
    assert feed.fresh(30.0) is None  # not read for too long: not known any more


def test_a_revoked_keys_verifications_leave_the_cache() -> None:
    cache: VerificationCache[str | None] = VerificationCache(ttl=30, stale_grace=600)
    cache.put(b"a", "key-a", 0.0)
    cache.put(b"b", "key-b", 0.0)
    cache.put(b"x", None, 0.0)  # a refusal
    assert cache.drop(lambda key: key == "key-a") == 1
    assert cache.fresh(b"a", 1.0) is None
    assert cache.fresh(b"b", 1.0) is not None and cache.fresh(b"x", 1.0) is not None
    assert cache.stale(b"a", 1.0) is None  # not kept for an outage either
