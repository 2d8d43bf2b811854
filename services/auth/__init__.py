"""The auth service: API keys (hashed in PostgreSQL) checked for Envoy at the edge, and
managed by operators.

`keys` is the key format and hashing (keys are tokens the mesh's signing key signs,
`signing`, which the edge checks by itself); `store` keeps keys and caches verified
ones, dropping a revoked key's within a second (`revocations`);
`authz` answers Envoy's external authorization checks; `servicer` is the operators'
KeyService.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from switchboard.auth.v1 import auth_service_pb2, auth_service_pb2_grpc

from services.auth.authz import AuthorizationServicer
from services.auth.config import AuthConfig
from services.auth.servicer import KeyServicer
from services.auth.signing import SigningKey
from services.auth.store import Caller, KeyStore
from services.runtime import load_config, public_services, stop_task

logger = logging.getLogger(__name__)

__all__ = ["AuthConfig", "AuthService", "Caller", "KeyStore"]

SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
KEY_SERVICE = auth_service_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name


class AuthService:
    name = "auth"
    service_names: Sequence[str] = (KEY_SERVICE, SERVICE_NAME)

    def __init__(self, config: AuthConfig | None = None) -> None:
        self._config = config or load_config(AuthConfig, prefix="SWITCHBOARD_")
        self.store = KeyStore(
            self._config.database_url,
            cache_ttl=self._config.auth_cache_ttl,
            stale_grace=self._config.auth_stale_grace,
            signer=(
                SigningKey.load(Path(self._config.auth_signing_key))
                if self._config.auth_signing_key
                else None
            ),
        )
        self._revocations: asyncio.Task[None] | None = None

    async def start(self) -> None:
        public_services()  # loads every contract, whose authority the checks read
        await self.store.open()
        self._revocations = asyncio.create_task(
            self.store.revocations.follow(self.store.forget_revoked)
        )

    def register(self, server: grpc.aio.Server) -> None:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationServicer(self.store), server
        )
        auth_service_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(self.store), server)

    async def ready(self) -> bool:
        return await self.store.healthy()

    async def shutdown(self) -> None:
        await stop_task(self._revocations)
        await self.store.close()
