"""The admission service: token-aware quotas, priority classes and fair queueing.

The decision core is plain, network-free Python (`clock`, `bucket`, `limits`,
`scheduler`, `controller`); the gRPC servicer and the PostgreSQL policy store sit on
top of `AdmissionController`, and Envoy routes each tenant to one replica by a
consistent hash of `x-tenant-id`, so replicas share no counters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from switchboard.admission.v1 import admission_service_pb2, admission_service_pb2_grpc

from services.admission import metrics
from services.admission.capacity import CapacityFeed
from services.admission.config import AdmissionConfig, load_admission_config
from services.admission.controller import AdmissionController
from services.admission.servicer import AdmissionServicer
from services.admission.store import PolicyStore

logger = logging.getLogger(__name__)

__all__ = ["AdmissionConfig", "AdmissionService"]

SERVICE_NAME = admission_service_pb2.DESCRIPTOR.services_by_name["AdmissionService"].full_name


class AdmissionService:
    """The runtime's view of the service: the controller's dispatcher, the policy store."""

    name = "admission"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self._config = config or load_admission_config()
        self.controller: AdmissionController | None = None
        self.store: PolicyStore | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._collector: metrics.Collector | None = None
        self.capacity: CapacityFeed | None = None

    async def start(self) -> None:
        config = self._config
        self.controller = AdmissionController(
            default_policy=config.default_policy,
            lease_ttl=config.admission_lease_ttl,
            wait_observer=metrics.observe_wait,
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
        self._dispatcher = asyncio.create_task(self.controller.run(), name="admission-dispatcher")
        self._collector = metrics.register(self.controller)
        if config.inference_target:
            self.capacity = CapacityFeed(
                target=config.inference_target,
                controller=self.controller,
                streams_per_backend=config.admission_streams_per_backend,
                replicas=config.admission_replicas,
                interval=config.admission_capacity_poll,
                fixed=fixed,
            )
            self.capacity.start()

    def register(self, server: grpc.aio.Server) -> None:
        assert self.controller is not None and self.store is not None, "start() first"
        admission_service_pb2_grpc.add_AdmissionServiceServicer_to_server(
            AdmissionServicer(
                self.controller,
                self.store,
                replica_id=self._config.admission_replica_id,
                default_policy=self._config.default_policy,
                default_max_wait=self._config.admission_default_max_wait,
                deadline_margin=self._config.admission_deadline_margin,
            ),
            server,
        )

    async def ready(self) -> bool:
        """Serving while the dispatcher runs; policies stay in force if the store is down."""
        return self._dispatcher is not None and not self._dispatcher.done()

    async def shutdown(self) -> None:
        if self.capacity is not None:
            await self.capacity.close()
        if self.controller is not None:
            await self.controller.shutdown()
        if self._dispatcher is not None:
            await self._dispatcher
            self._dispatcher = None
        if self.store is not None:
            await self.store.close()
        if self._collector is not None:
            metrics.unregister(self._collector)
            self._collector = None
