"""Configuration of the admission service."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from services.admission.limits import DEFAULT_POLICY, PolicyLimits
from services.runtime import load_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdmissionConfig:
    """Read from `SWITCHBOARD_*`; the launcher sets the database URL and the replica id."""

    database_url: str
    """PostgreSQL holding the policies (`SWITCHBOARD_DATABASE_URL`)."""
    admission_replica_id: str = "admission"
    """This replica's name, sent back in the `x-admission-replica` response header."""
    admission_policy_poll: timedelta = timedelta(seconds=1)
    """How often stored policies are checked for changes made through other replicas."""
    admission_lease_ttl: timedelta = timedelta(minutes=10)
    """A lease never released is freed after this long (its charge is kept)."""
    admission_handover_warmup: timedelta = timedelta(seconds=10)
    """After the replica set changes, a tenant new to this replica gets its full bursts
    back within this long at the latest (`handover`: the over-admission a move may cost
    is at most max(0, burst − rate × this) per bucket)."""
    admission_default_max_wait: timedelta = timedelta(seconds=30)
    """Longest queue wait for an Admit call that has neither max_wait nor a deadline."""
    admission_deadline_margin: timedelta = timedelta(milliseconds=50)
    """An Admit waits at most until this long before its deadline, so the refusal (with
    its RetryInfo) reaches the caller before the deadline does."""
    admission_tier_max_in_flight: tuple[str, ...] = ()
    """Static ceilings per model tier on each replica (not split over the replicas), e.g.
    `small=64,large=16`; a tier listed here is not sized from the inference service's
    reports."""
    inference_target: str = ""
    """Where InferenceService.ListModels is read to size the tier ceilings; empty = no
    ceilings but the static ones."""
    admission_capacity_poll: timedelta = timedelta(seconds=2)
    admission_streams_per_backend: int = 16
    """Concurrent streams one healthy backend serves per model (Triton's
    `max_concurrent_streams`)."""
    admission_replicas: int = 1
    """Admission replicas sharing the tier ceilings (each enforces its share), until
    this replica has read the live ones from the database (`membership`)."""
    admission_membership_poll: timedelta = timedelta(seconds=1)
    """How often a replica stamps its row in `admission_replicas` and reads the others'."""
    admission_membership_stale_after: timedelta = timedelta(seconds=5)
    """A replica whose row was not stamped for this long died: its share of the tier
    ceilings goes back to the others."""
    admission_default_requests_per_second: float = DEFAULT_POLICY.requests_per_second
    admission_default_request_burst: int = DEFAULT_POLICY.request_burst
    admission_default_tokens_per_minute: int = DEFAULT_POLICY.tokens_per_minute
    admission_default_token_burst: int = DEFAULT_POLICY.token_burst
    admission_default_max_in_flight: int = DEFAULT_POLICY.max_in_flight
    admission_default_max_queued: int = DEFAULT_POLICY.max_queued

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ValueError("SWITCHBOARD_DATABASE_URL must name the policy database")
        if self.admission_policy_poll <= timedelta(0):
            raise ValueError("SWITCHBOARD_ADMISSION_POLICY_POLL must be positive")
        if self.admission_handover_warmup <= timedelta(0):
            raise ValueError("SWITCHBOARD_ADMISSION_HANDOVER_WARMUP must be positive")
        poll, stale = self.admission_membership_poll, self.admission_membership_stale_after
        if not timedelta(0) < poll < stale:
            raise ValueError(
                "SWITCHBOARD_ADMISSION_MEMBERSHIP_POLL must be positive and shorter than "
                "SWITCHBOARD_ADMISSION_MEMBERSHIP_STALE_AFTER"
            )
        if violations := self.default_policy.validate(prefix="default "):
            raise ValueError("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.tier_ceilings()  # fails on a malformed entry
        if self.admission_streams_per_backend < 1 or self.admission_replicas < 1:
            raise ValueError(
                "SWITCHBOARD_ADMISSION_STREAMS_PER_BACKEND and SWITCHBOARD_ADMISSION_REPLICAS "
                "must be at least 1"
            )

    @property
    def default_policy(self) -> PolicyLimits:
        return PolicyLimits(
            requests_per_second=self.admission_default_requests_per_second,
            request_burst=self.admission_default_request_burst,
            tokens_per_minute=self.admission_default_tokens_per_minute,
            token_burst=self.admission_default_token_burst,
            max_in_flight=self.admission_default_max_in_flight,
            max_queued=self.admission_default_max_queued,
        )

    def tier_ceilings(self) -> dict[str, int]:
        """`SWITCHBOARD_ADMISSION_TIER_MAX_IN_FLIGHT` as {tier: most requests in flight}."""
        ceilings = {}
        for entry in self.admission_tier_max_in_flight:
            tier, sep, value = entry.partition("=")
            if not sep or not tier.strip() or not value.strip().isdigit():
                raise ValueError(
                    f"SWITCHBOARD_ADMISSION_TIER_MAX_IN_FLIGHT: {entry!r} is not tier=count"
                )
            ceilings[tier.strip()] = int(value)
        return ceilings


def load_admission_config() -> AdmissionConfig:
    return load_config(AdmissionConfig, prefix="SWITCHBOARD_")
