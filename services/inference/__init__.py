"""The inference (routing) service: model tiers, backend balancing, circuit breakers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from switchboard.inference.v1 import inference_service_pb2, inference_service_pb2_grpc

from services.inference import metrics
from services.inference.admission import AdmissionGate
from services.inference.config import InferenceConfig, load_inference_config
from services.inference.policy import ModelPolicy
from services.inference.router import Router
from services.inference.servicer import InferenceServicer
from services.inference.triton import TritonBackend
from services.inference.upstream import OpenAIBackend

logger = logging.getLogger(__name__)

__all__ = ["InferenceService", "InferenceConfig", "load_inference_config"]

SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class InferenceService:
    """The runtime's view of the service: servicer, backends' lifecycle, readiness."""

    name = "inference"
    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, config: InferenceConfig | None = None) -> None:
        self._config = config or load_inference_config()
        self.router: Router | None = None
        self.admission: AdmissionGate | None = None
        self._collector: metrics.Collector | None = None

    async def start(self) -> None:
        config = self._config
        backends = [
            TritonBackend(
                url,
                breaker_fail_max=config.breaker_fail_max,
                breaker_reset=config.breaker_reset,
                generation_idle=config.generation_idle_timeout,
            )
            for url in config.triton_urls
        ]
        policy = ModelPolicy.load(config.model_policy)
        upstreams = {
            g.name: [
                OpenAIBackend(
                    g.upstream,
                    breaker_fail_max=config.breaker_fail_max,
                    breaker_reset=config.breaker_reset,
                    generation_idle=config.generation_idle_timeout,
                )
            ]
            for g in policy.generators
            if g.upstream is not None
        }
        self.router = Router(
            policy=policy,
            backends=backends,
            upstreams=upstreams,
            affinity_slack=config.affinity_slack,
            embed_max_texts=config.embed_max_texts,
        )
        await self.router.refresh()
        router = self.router
        self._collector = metrics.register(
            lambda: [(b.name, b.breaker) for b in router.every_backend]
        )
        if config.admission_target:
            self.admission = AdmissionGate(
                config.admission_target, slice_size=config.admission_slice
            )

    def register(self, server: grpc.aio.Server) -> None:
        assert self.router is not None, "start() first"
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.router, admission=self.admission), server
        )

    async def ready(self) -> bool:
        assert self.router is not None
        return await self.router.refresh()

    async def shutdown(self) -> None:
        if self._collector is not None:
            metrics.unregister(self._collector)
            self._collector = None
        if self.admission is not None:
            await self.admission.close()
        if self.router is not None:
            for backend in self.router.every_backend:
                await backend.close()
