"""The admission service: token-aware quotas, priority classes and fair queueing.

The decision core is plain, network-free Python, one job per module:

- `request`: the `AdmissionRequest` value a caller submits;
- `limits`, `bucket`, `clock`: policies and tier ceilings, token buckets, clocks;
- `policies`: the registry of tenant and user scopes with their policies, and tiers;
- `ledger`: leases (under tenant-bound ids), named attempts, tombstones;
- `scheduler`: the fair queue; `tickets`: one request's way through it;
- `refusals`: why a request cannot run, and the refusal that says so;
- `controller`: `AdmissionController`, the decisions, on an injected clock;
- `dispatcher`: `Dispatcher`, the asyncio loop and the callers waiting on it;
- `handover`: what a tenant's state does when the replica set changes, and the bound
  on the over-admission that costs.

The gRPC servicer (`servicer`, `sessions`) maps proto to that core and back, and the
PostgreSQL policy store (`store`) keeps every replica's policies in step. Envoy routes
each tenant to one replica by a consistent hash of `x-tenant-id`, so replicas share no
counters; each reads which replicas are alive (`membership`) to split the tier
ceilings and to know when tenants may have moved.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from switchboard.admission.v1 import admission_service_pb2, admission_service_pb2_grpc

from services.admission import metrics
from services.admission.capacity import CapacityFeed
from services.admission.clock import Clock, FakeClock, MonotonicClock
from services.admission.config import AdmissionConfig, load_admission_config
from services.admission.controller import AdmissionController
from services.admission.dispatcher import Dispatcher
from services.admission.handover import Handover
from services.admission.ledger import Lease
from services.admission.limits import DEFAULT_POLICY, PolicyLimits, Priority, TierCapacity
from services.admission.membership import Membership
from services.admission.policies import QuotaSnapshot
from services.admission.request import AdmissionRequest
from services.admission.servicer import AdmissionServicer
from services.admission.store import PolicyStore
from services.admission.tickets import Admission, QueuePosition, Ticket, TicketState

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_POLICY",
    "Admission",
    "AdmissionConfig",
    "AdmissionController",
    "AdmissionRequest",
    "AdmissionService",
    "Clock",
    "Dispatcher",
    "FakeClock",
    "Lease",
    "MonotonicClock",
    "PolicyLimits",
    "Priority",
    "QueuePosition",
    "QuotaSnapshot",
    "Ticket",
    "TicketState",
    "TierCapacity",
]

SERVICE_NAME = admission_service_pb2.DESCRIPTOR.services_by_name["AdmissionService"].full_name


class AdmissionService:
    """The runtime's view of the service: the controller and its dispatcher, the policy
    store, the live replica set, the tier ceilings' feed."""

    name = "admission"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self._config = config or load_admission_config()
        self.controller: AdmissionController | None = None
        self.dispatcher: Dispatcher | None = None
        self.store: PolicyStore | None = None
        self._running: asyncio.Task[None] | None = None
        self._collector: metrics.Collector | None = None
        self.capacity: CapacityFeed | None = None
        self.handover: Handover | None = None
        self.membership: Membership | None = None

    async def start(self) -> None:
        config = self._config
        self.controller = AdmissionController(
            default_policy=config.default_policy,
            lease_ttl=config.admission_lease_ttl,
            wait_observer=metrics.observe_wait,
            warmup=config.admission_handover_warmup,
        )
        self.handover = Handover(
            controller=self.controller, split=self._split, replicas=config.admission_replicas
        )
        fixed = config.tier_ceilings()
        for tier, ceiling in fixed.items():
            self.controller.set_tier_capacity(tier, max_in_flight=ceiling)
        self.store = PolicyStore(
            database_url=config.database_url,
            controller=self.controller,
            poll_interval=config.admission_policy_poll,
        )
        await self.store.start()
        self.dispatcher = Dispatcher(self.controller)
        self._running = asyncio.create_task(self.dispatcher.run(), name="admission-dispatcher")
        self._collector = metrics.register(self.controller)
        if config.inference_target:
            self.capacity = CapacityFeed(
                target=config.inference_target,
                controller=self.controller,
                streams_per_backend=config.admission_streams_per_backend,
                replicas=self.handover.replicas,
                interval=config.admission_capacity_poll,
                fixed=fixed,
            )
            self.capacity.start()
        self.membership = Membership(
            database_url=config.database_url,
            replica_id=config.admission_replica_id,
            observe=self.handover.observe,
            interval=config.admission_membership_poll,
            stale_after=config.admission_membership_stale_after,
        )
        await self.membership.start()

    def _split(self, replicas: int) -> None:
        if self.capacity is not None:
            self.capacity.set_replicas(replicas)

    def register(self, server: grpc.aio.Server) -> None:
        assert self.dispatcher is not None and self.store is not None, "start() first"
        admission_service_pb2_grpc.add_AdmissionServiceServicer_to_server(
            AdmissionServicer(
                self.dispatcher,
                self.store,
                replica_id=self._config.admission_replica_id,
                default_policy=self._config.default_policy,
                default_max_wait=self._config.admission_default_max_wait,
                deadline_margin=self._config.admission_deadline_margin,
            ),
            server,
        )

    async def ready(self) -> bool:
        """Serving while the dispatcher runs, once the other replicas have seen this one
        (so their shares of the tier ceilings shrink before it admits); policies stay in
        force if the store is down."""
        running = self._running is not None and not self._running.done()
        return running and self.membership is not None and self.membership.settled

    async def drain(self) -> None:
        """Stopping: AdmitSession streams end now, not after the server's grace."""
        if self.dispatcher is not None:
            self.dispatcher.drain()

    async def shutdown(self) -> None:
        if self.membership is not None:  # the others take back its share
            await self.membership.close()
            self.membership = None
        if self.capacity is not None:
            await self.capacity.close()
        if self.dispatcher is not None:
            await self.dispatcher.shutdown()
        if self._running is not None:
            await self._running
            self._running = None
        if self.store is not None:
            await self.store.close()
        if self._collector is not None:
            metrics.unregister(self._collector)
            self._collector = None
