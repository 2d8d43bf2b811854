"""The API's handlers: each maps an OpenAI request onto one InferenceService call made
as the caller's tenant, and the reply (or the call's error) back.

The tenant is the `x-tenant-id` the edge set from the verified API key, and the caller's
kind (`x-switchboard-principal`) is checked against the RPC's contract, as a service
would: an operator credential reaches no tenant's generations.

Streams (`stream: true`) start answering at the call's first message, so a call refused
before that (admission's refusal, a bad value, an unknown model) is an ordinary HTTP
error with its status; while the call waits in admission's queue its position goes out
as SSE comments, and an error after that is a last `data: {"error": ...}` event. A client
that goes away cancels the handler (aiohttp's handler cancellation), and with it the
gRPC call: generation stops at Triton and admission releases the lease or queue place.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from aiohttp import web
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from services.gateway import requests, responses, sse
from services.gateway.config import GatewayConfig
from services.runtime import (
    PRINCIPAL_HEADER,
    REQUEST_ID_HEADER,
    TENANT_HEADER,
    FieldViolation,
    HttpError,
    Internal,
    InvalidArgument,
    NotFound,
    Principal,
    ResourceExhausted,
    Unauthenticated,
    catalogue,
    http_error,
    invalid,
    method_contract,
    status_of,
)

logger = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"
"""Backend affinity (KV-cache reuse) for a conversation; without it, the `user` field."""
TIMEOUT_HEADER = "x-switchboard-timeout"
"""The call's deadline in seconds, admission queueing included."""
SDK_TIMEOUT_HEADER = "x-stainless-read-timeout"
"""The OpenAI SDKs' read timeout: the deadline of a call that is not streamed."""
_INFERENCE = catalogue.INFERENCE.grpc_services[0]
GENERATE = f"/{_INFERENCE}/Generate"
EMBED = f"/{_INFERENCE}/Embed"
LIST_MODELS = f"/{_INFERENCE}/ListModels"


class HttpFailure(Exception):
    """Ends a request with `error` (the server's middleware answers it)."""

    def __init__(self, error: HttpError) -> None:
        super().__init__(error.body["error"]["message"])
        self.error = error


def relayed(error: grpc.aio.AioRpcError, names: Callable[[str], str] | None = None) -> HttpFailure:
    """InferenceService's error as the HTTP error it stands for."""
    return HttpFailure(http_error(status_of(error), param=names))


def error_response(error: HttpError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.json_bytes(),
        content_type="application/json",
        headers=error.headers,
    )


@dataclass(frozen=True)
class Caller:
    """Who a request is for, and what its gRPC call carries."""

    metadata: tuple[tuple[str, str], ...]
    request_id: str
    timeout: float


class Api:
    """The handlers, on one InferenceService stub."""

    def __init__(
        self, stub: inference_service_pb2_grpc.InferenceServiceStub, config: GatewayConfig
    ) -> None:
        self._stub = stub
        self._config = config

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.post("/v1/embeddings", self.embeddings),
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model}", self.get_model),
        ]

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        session = request.headers.get(SESSION_HEADER, "")
        call = requests.chat_call(await self._body(request), session_id=session)
        caller = self._caller(request, GENERATE, streamed=call.stream)
        names = requests.param_names("messages")
        return await self._generate(request, caller, call, responses.ChatShape(), names)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        session = request.headers.get(SESSION_HEADER, "")
        call = requests.completion_call(await self._body(request), session_id=session)
        caller = self._caller(request, GENERATE, streamed=call.stream)
        names = requests.param_names("prompt")
        return await self._generate(request, caller, call, responses.TextShape(), names)

    async def embeddings(self, request: web.Request) -> web.Response:
        call = requests.embed_call(await self._body(request))
        caller = self._caller(request, EMBED)
        try:
            reply = await self._stub.Embed(
                call.request, metadata=caller.metadata, timeout=caller.timeout
            )
        except grpc.aio.AioRpcError as error:
            raise relayed(error, requests.param_names("input")) from None
        if call.dimensions is not None and call.dimensions != reply.dimensions:
            raise invalid(
                [
                    FieldViolation(
                        "dimensions", f"{reply.model}'s vectors have {reply.dimensions} dimensions"
                    )
                ]
            )
        return web.json_response(responses.embeddings(reply, as_base64=call.base64))

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(responses.models(await self._models(request)))

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for info in (await self._models(request)).models:
            if info.name == name:
                return web.json_response(responses.model(info))
        raise NotFound(
            f"no model named {name!r}", reason="MODEL_NOT_FOUND", metadata={"model": name}
        )

    # -- the parts ------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> inference_pb2.ListModelsResponse:
        caller = self._caller(request, LIST_MODELS)
        try:
            return await self._stub.ListModels(  # type: ignore[no-any-return]
                inference_pb2.ListModelsRequest(), metadata=caller.metadata, timeout=caller.timeout
            )
        except grpc.aio.AioRpcError as error:
            raise relayed(error) from None

    def _caller(self, request: web.Request, method: str, *, streamed: bool = False) -> Caller:
        contract = method_contract(method)
        assert contract is not None, method
        contract.check_caller(Principal.from_header(request.headers.get(PRINCIPAL_HEADER)))
        tenant = request.headers.get(TENANT_HEADER, "")
        if not tenant:
            raise Unauthenticated(
                f"this call needs a tenant: the edge sets {TENANT_HEADER} from the API key",
                reason="TENANT_MISSING",
            )
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        return Caller(
            metadata=((TENANT_HEADER, tenant), (REQUEST_ID_HEADER, request_id)),
            request_id=request_id,
            timeout=self._timeout(request, streamed=streamed),
        )

    def _timeout(self, request: web.Request, *, streamed: bool) -> float:
        """The client's deadline: ours, or its SDK's read timeout for a whole answer."""
        headers = (TIMEOUT_HEADER,) if streamed else (TIMEOUT_HEADER, SDK_TIMEOUT_HEADER)
        longest = self._config.max_timeout.total_seconds()
        for header in headers:
            raw = request.headers.get(header)
            if raw is None:
                continue
            try:
                seconds = float(raw)
            except ValueError:
                seconds = math.nan
            if not seconds > 0 or math.isinf(seconds):
                raise invalid([FieldViolation(header, "must be a positive number of seconds")])
            return min(seconds, longest)
        return self._config.timeout.total_seconds()

    async def _body(self, request: web.Request) -> object:
        """The JSON body, read only while within the size limit."""
        limit = self._config.max_body_bytes
        too_large = ResourceExhausted(
            f"the request body is over the limit of {limit} bytes",
            reason="MESSAGE_TOO_LARGE",
            metadata={"limit_bytes": str(limit)},
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as error:
            raise InvalidArgument(
                "the request body is not valid JSON",
                field_violations=[FieldViolation("body", str(error)[:100])],
            ) from None

    async def _generate(
        self,
        request: web.Request,
        caller: Caller,
        call: requests.GenerateCall,
        shape: responses.Shape,
        names: Callable[[str], str],
    ) -> web.StreamResponse:
        completion = responses.Completion(
            id=shape.id_prefix + caller.request_id, created=int(time.time()), model=call.model
        )
        grpc_call = self._stub.Generate(
            call.request, metadata=caller.metadata, timeout=caller.timeout
        )
        try:
            if call.stream:
                return await _stream(request, grpc_call, call, shape, completion, names)
            text: list[str] = []
            complete = None
            try:
                async for reply in grpc_call:
                    if reply.HasField("token"):
                        text.append(reply.token.text)
                    elif reply.HasField("complete"):
                        complete = reply.complete
            except grpc.aio.AioRpcError as error:
                raise relayed(error, names) from None
            if complete is None:
                raise Internal("the generation ended without its summary")
            return web.json_response(
                shape.whole(completion, "".join(text), complete),
                headers=responses.provenance_headers(complete),
            )
        finally:
            grpc_call.cancel()  # at once when the client went away: frees admission


async def _stream(
    request: web.Request,
    grpc_call: grpc.aio.UnaryStreamCall,
    call: requests.GenerateCall,
    shape: responses.Shape,
    completion: responses.Completion,
    names: Callable[[str], str],
) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    begun = False
    try:
        async for reply in grpc_call:
            kind = reply.WhichOneof("event")
            if response is None:
                response = web.StreamResponse(
                    headers={"Content-Type": sse.CONTENT_TYPE, "Cache-Control": "no-cache"}
                )
                await response.prepare(request)
            if kind == "queued":
                await response.write(sse.queue_position(reply.queued.position))
                continue
            if not begun:
                begun = True
                if (first := shape.first(completion)) is not None:
                    await response.write(sse.event(first))
            if kind == "token":
                await response.write(sse.event(shape.piece(completion, reply.token.text)))
            elif kind == "complete":
                await response.write(sse.event(shape.last(completion, reply.complete)))
                if call.include_usage:
                    await response.write(sse.event(shape.usage_chunk(completion, reply.complete)))
                await response.write(sse.DONE)
    except grpc.aio.AioRpcError as error:
        failure = relayed(error, names)
        if response is None:
            raise failure from None
        await response.write(sse.event(failure.error.body))
    except ConnectionError:  # the client went away mid-write
        logger.info("client disconnected mid-stream")
        grpc_call.cancel()
    if response is None:
        raise Internal("the generation ended without any message")
    return response
