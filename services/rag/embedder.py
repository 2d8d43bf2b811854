"""The RAG service's client of InferenceService.Embed (Triton batches the calls)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

import grpc
import numpy as np
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from services.runtime import (
    RelayedError,
    SwitchboardError,
    channel,
    dependency_unavailable,
    status_of,
)

logger = logging.getLogger(__name__)

EMBED_CHARS = 4096
"""Characters of a chunk sent to the embedder: MiniLM reads its first 256 word pieces
(about 1,000 characters) and ignores the rest, so longer texts only cost bandwidth."""
_DEPENDENCY_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED,
}


class Embedder:
    """Embeds texts through the mesh; failures become UNAVAILABLE `DEPENDENCY_UNAVAILABLE`."""

    def __init__(self, target: str, *, model: str = "") -> None:
        self._channel = channel(target, default_timeout=timedelta(seconds=30))
        self._stub = inference_service_pb2_grpc.InferenceServiceStub(self._channel)
        self._model = model
        self.model_name = model
        self.dimensions = 0

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised float32 row per text.

        Raises:
            SwitchboardError: UNAVAILABLE when the embedder cannot answer; the inference
                service's own error (relayed) when it refuses the request.
        """
        request = inference_pb2.EmbedRequest(
            texts=[t[:EMBED_CHARS] for t in texts], model=self._model
        )
        try:
            reply = await self._stub.Embed(request)
        except grpc.aio.AioRpcError as error:
            raise _relay(error) from None
        vectors = np.array([e.values for e in reply.embeddings], dtype=np.float32)
        self.model_name, self.dimensions = reply.model, reply.dimensions
        return vectors

    async def close(self) -> None:
        await self._channel.close()


def _relay(error: grpc.aio.AioRpcError) -> SwitchboardError:
    if error.code() in _DEPENDENCY_CODES:
        return dependency_unavailable("inference", "embedder", error)
    return RelayedError(error.code(), status_of(error))
