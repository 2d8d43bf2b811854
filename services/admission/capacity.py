"""Tier ceilings sized from what the inference service reports about its backends.

Each model tier may have at most (healthy backends × streams per backend) requests in
flight, summed over the tier's generator models and split evenly over the admission
replicas alive now (`membership`, draining ones included), since each replica
enforces its ceiling alone; a change of the replica set re-splits them at once. With
no healthy backend a tier gets no ceiling: the inference service then refuses at once
with its own `BACKENDS_UNAVAILABLE` and RetryInfo, which says more than a queue would.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from datetime import timedelta

import grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from services.admission.controller import AdmissionController
from services.runtime import TIERS, channel, stop_task

logger = logging.getLogger(__name__)


def size_tiers(
    models: inference_pb2.ListModelsResponse, *, streams_per_backend: int, replicas: int
) -> dict[str, int | None]:
    """{tier: most requests in flight on this replica}, None = no ceiling."""
    totals: dict[str, int] = {}
    for model in models.models:
        tier = TIERS.get(model.tier)
        if model.kind != inference_pb2.MODEL_KIND_GENERATOR or tier is None:
            continue
        healthy = sum(b.state == inference_pb2.BACKEND_STATE_HEALTHY for b in model.backends)
        totals[tier] = totals.get(tier, 0) + healthy * streams_per_backend
    return {tier: math.ceil(total / replicas) or None for tier, total in totals.items()}


class CapacityFeed:
    """Polls InferenceService.ListModels and keeps the controller's tier ceilings in step.

    Tiers with a static ceiling (`fixed`) are left alone.
    """

    def __init__(
        self,
        *,
        target: str,
        controller: AdmissionController,
        streams_per_backend: int,
        replicas: int,
        interval: timedelta,
        fixed: Mapping[str, int] | None = None,
    ) -> None:
        self._channel = channel(target, default_timeout=timedelta(seconds=2))
        self._stub = inference_service_pb2_grpc.InferenceServiceStub(self._channel)
        self._controller = controller
        self._streams = streams_per_backend
        self._replicas = max(replicas, 1)
        self._interval = interval.total_seconds()
        self._fixed = dict(fixed or {})
        self.ceilings: dict[str, int | None] = {}
        self._models: inference_pb2.ListModelsResponse | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def replicas(self) -> int:
        return self._replicas

    def set_replicas(self, replicas: int) -> None:
        """Splits the ceilings over `replicas` from now on, re-sizing them at once from
        the last report (a replica that joined must not wait a poll for its peers'
        shares to shrink)."""
        self._replicas = max(replicas, 1)
        if self._models is not None:
            self.apply(self._models)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="admission-capacity-feed")

    async def close(self) -> None:
        await stop_task(self._task)
        await self._channel.close()

    async def refresh(self) -> None:
        self.apply(await self._stub.ListModels(inference_pb2.ListModelsRequest()))

    def apply(self, models: inference_pb2.ListModelsResponse) -> None:
        """Sizes the ceilings from a ListModels report (kept for `set_replicas`)."""
        self._models = models
        sized = size_tiers(models, streams_per_backend=self._streams, replicas=self._replicas)
        for tier, ceiling in sized.items():
            if tier in self._fixed or self.ceilings.get(tier, -1) == ceiling:
                continue
            self._controller.set_tier_capacity(tier, max_in_flight=ceiling)
            self.ceilings[tier] = ceiling
            logger.info("tier ceiling set", extra={"tier": tier, "max_in_flight": ceiling})

    async def _run(self) -> None:
        failing = False
        known = False  # until the first report, retry quickly (the edge may be starting)
        while True:
            try:
                await self.refresh()
                failing, known = False, True
            except grpc.aio.AioRpcError as error:  # keep the last ceilings meanwhile
                if not failing and known:
                    logger.warning("cannot read inference capacity: %s", error.code().name)
                failing = True
            except Exception:  # a bug; keep polling
                logger.exception("capacity feed failed")
            await asyncio.sleep(self._interval if known else min(self._interval, 0.25))
