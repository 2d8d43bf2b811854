"""The ledger and the policy registry on their own: leases, attempts, tombstones, scopes."""

from __future__ import annotations

import pytest

from services.admission import AdmissionRequest, PolicyLimits, TierCapacity
from services.admission.ledger import Ledger
from services.admission.policies import PolicyRegistry
from services.admission.tickets import Ticket
from services.runtime import Cancelled, InvalidArgument

POLICY = PolicyLimits(
    requests_per_second=2,
    request_burst=4,
    tokens_per_minute=6_000,
    token_burst=1_000,
    max_in_flight=3,
    weight=2,
)


@pytest.fixture
def weights() -> dict[str, int]:
    return {}


@pytest.fixture
def registry(weights) -> PolicyRegistry:
    return PolicyRegistry(default=POLICY, set_weight=weights.__setitem__)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(lease_ttl=60.0, tombstone_ttl=10.0, max_tombstones=2)


def ticket(registry: PolicyRegistry, seq: int = 1, now: float = 0.0, **request) -> Ticket:
    asked = AdmissionRequest(**{"tenant_id": "acme", **request})
    return Ticket(seq, asked, registry.tenant(asked.tenant_id, now), None, None, now)


# ---- ledger -------------------------------------------------------------------------


def test_a_lease_id_names_a_lease_of_its_tenant_only(ledger, registry):
    lease = ledger.issue(ticket(registry, prompt_tokens=7), now=5.0)
    assert (lease.tenant_id, lease.charged_tokens, lease.expires_at) == ("acme", 7, 65.0)
    assert ledger.issued_to("acme", lease.lease_id)
    for forged in (lease.lease_id, lease.lease_id + "x", lease.lease_id.rpartition(".")[0]):
        assert not ledger.issued_to("other", forged)
    assert not ledger.issued_to("acme", "no-dot-at-all")
    other = Ledger(lease_ttl=60.0, tombstone_ttl=10.0, max_tombstones=2)
    assert not other.issued_to("acme", lease.lease_id)  # another replica's key


def test_leases_are_taken_once_and_expire_in_issue_order(ledger, registry):
    first = ledger.issue(ticket(registry, 1), now=0.0)
    second = ledger.issue(ticket(registry, 2), now=1.0)
    assert len(ledger) == 2 and ledger.next_expiry() == 60.0
    assert [h.lease for h in ledger.expired(59.9)] == []
    assert [h.lease for h in ledger.expired(60.0)] == [first]
    assert ledger.take(first.lease_id) is None  # expired: already gone
    held = ledger.take(second.lease_id)
    assert held is not None and held.lease == second and held.tenant.tenant_id == "acme"
    assert ledger.take(second.lease_id) is None
    assert len(ledger) == 0 and ledger.next_expiry() == float("inf")


def test_a_named_attempt_ends_with_its_lease(ledger, registry):
    named = ticket(registry, request_id="r1")
    ledger.begin_attempt(named)
    with pytest.raises(InvalidArgument) as in_use:
        ledger.check_attempt("acme", "r1", now=0.0)
    assert [v.field for v in in_use.value.field_violations] == ["request_id"]
    ledger.check_attempt("other", "r1", now=0.0)  # ids are per tenant
    assert ledger.attempt("acme", "r1") is named
    lease = ledger.issue(named, now=0.0)
    ledger.take(lease.lease_id)
    assert ledger.attempts == 0 and ledger.attempt("acme", "r1") is None


def test_an_attempt_that_ends_without_a_lease_is_forgotten_only_if_it_is_the_known_one(
    ledger, registry
):
    known, stranger = ticket(registry, 1, request_id="r"), ticket(registry, 2, request_id="r")
    ledger.begin_attempt(known)
    ledger.end_attempt(stranger)
    assert ledger.attempt("acme", "r") is known
    ledger.end_attempt(known)
    assert ledger.attempts == 0


def test_tombstones_refuse_a_late_attempt_until_they_lapse_and_are_bounded(ledger):
    ledger.bury("acme", "late", now=0.0)
    with pytest.raises(Cancelled):
        ledger.check_attempt("acme", "late", now=9.9)
    ledger.check_attempt("acme", "late", now=10.0)  # lapsed
    for n in range(3):
        ledger.bury("acme", f"gone-{n}", now=20.0)
    assert ledger.tombstones == 2
    ledger.check_attempt("acme", "gone-0", now=20.0)  # the oldest was forgotten
    with pytest.raises(Cancelled):
        ledger.check_attempt("acme", "gone-2", now=20.0)


# ---- policy registry ------------------------------------------------------------------


def test_policies_fall_back_to_the_default_and_move_queue_weights(registry, weights):
    assert registry.policy("acme") == (POLICY, True)
    assert registry.policy("acme", "ann") == (None, True)
    scope = registry.tenant("acme", now=0.0)
    heavier = PolicyLimits(**{**_fields(POLICY), "weight": 5, "max_in_flight": 9})
    registry.set("acme", heavier, user_id="", now=0.0)
    assert registry.policy("acme") == (heavier, False)
    assert scope.policy == heavier and scope.explicit and weights == {"acme": 5}
    assert registry.delete("acme", user_id="", now=0.0)
    assert not registry.delete("acme", user_id="", now=0.0)
    assert scope.policy == POLICY and not scope.explicit and weights == {"acme": 2}


def test_a_user_has_a_scope_only_while_they_have_a_policy(registry):
    assert registry.user("acme", "ann", now=0.0) is None
    registry.set("acme", POLICY, user_id="ann", now=0.0)
    user = registry.user("acme", "ann", now=0.0)
    assert user is not None and user.subject == "tenant:acme/user:ann"
    registry.delete("acme", user_id="ann", now=0.0)
    assert registry.user("acme", "ann", now=0.0) is None and user.policy is None


def test_bad_policies_and_ceilings_are_refused_by_attribute(registry):
    bad = PolicyLimits(**{**_fields(POLICY), "max_in_flight": 0})
    with pytest.raises(InvalidArgument) as refused:
        registry.set("acme", bad, user_id="", now=0.0)
    assert [v.field for v in refused.value.field_violations] == ["max_in_flight"]
    with pytest.raises(InvalidArgument) as refused:
        registry.set("", POLICY, user_id="", now=0.0)
    assert [v.field for v in refused.value.field_violations] == ["tenant_id"]
    with pytest.raises(InvalidArgument):
        registry.set_tier_capacity("small", TierCapacity(max_in_flight=-1), hold=1.0)
    registry.set_tier_capacity("small", TierCapacity(max_in_flight=2), hold=1.0)
    assert registry.tier("small", hold=5.0).capacity.max_in_flight == 2


def test_a_snapshot_of_an_unseen_tenant_keeps_no_state_and_idle_tenants_are_forgotten(registry):
    snapshot = registry.snapshot("ghost", "", {}, now=0.0)
    assert snapshot.is_default and snapshot.available_tokens == POLICY.token_burst
    assert registry.collect_idle(now=0.0) == 0  # the snapshot kept nothing
    registry.tenant("acme", now=0.0)
    assert registry.collect_idle(now=0.0) == 1


def _fields(policy: PolicyLimits) -> dict[str, object]:
    return {name: getattr(policy, name) for name in policy.__dataclass_fields__}
