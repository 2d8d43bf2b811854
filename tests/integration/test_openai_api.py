"""The OpenAI-compatible HTTP API through Envoy's public port, with the official `openai`
clients (Python sync, async and streaming; Node.js) and raw HTTP for what clients hide:
the SSE framing, the error bodies, the edge's refusals, a client that goes away."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest
from google.protobuf import field_mask_pb2
from switchboard.admission.v1 import admission_pb2, admission_service_pb2_grpc
from switchboard.inference.v1 import inference_pb2, inference_service_pb2_grpc

from tests.integration.conftest import as_operator, as_tenant
from tests.polling import eventually

ROOT = Path(__file__).parents[2]
NODE_CLIENT = ROOT / "clients" / "node" / "openai.mjs"
FACTS = "Envoy is an edge proxy. It routes gRPC calls by service name. Cats purr when content."
QUESTION = "What does Envoy route?"
MESSAGES = [{"role": "system", "content": FACTS}, {"role": "user", "content": QUESTION}]
LONG_MESSAGES = [
    {
        "role": "system",
        "content": " ".join(
            f"Envoy routes, logs and retries call {i} "
            + " ".join(f"through hop {j}" for j in range(400))
            + "."
            for i in range(3)
        ),
    },
    {"role": "user", "content": "How does Envoy route, log and retry calls?"},
]
"""Three sentences of about 1,200 words each for the large model: the answer quotes them,
one or more of 1,200 tokens, streamed over seconds, long enough to cut short."""
LONG = {"model": "generator_large", "max_tokens": 2000, "messages": LONG_MESSAGES}


def new_tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


def key_of(tenant: str) -> str:
    return as_tenant(tenant)[0][1].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def base_url(envoy_target: str) -> str:
    return f"http://{envoy_target}/v1"


@pytest.fixture
def tenant() -> str:
    return new_tenant()


@pytest.fixture
def client(base_url: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key_of(tenant), max_retries=0, timeout=60)


@pytest.fixture
async def aclient(base_url: str, tenant: str):
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key=key_of(tenant), max_retries=0, timeout=60
    ) as client:
        yield client


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def grpc_channel(envoy_target: str):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield channel


def headers(tenant: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key_of(tenant)}", **extra}


async def sse_lines(response: aiohttp.ClientResponse):
    """The stream's non-empty lines, as they arrive."""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line:
            yield line


def data_events(lines: list[str]) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


# -- the official Python client ------------------------------------------------------------


def test_models_are_listed_and_retrieved(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert {"generator_small", "generator_large", "embedder"} <= set(ids)
    model = client.models.retrieve("generator_large")
    assert model.id == "generator_large" and model.owned_by == "switchboard"
    assert model.model_extra["switchboard"]["tier"] == "large"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-17")
    assert missing.value.code == "MODEL_NOT_FOUND"


def test_a_chat_completion_with_real_usage_and_its_provenance(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    completion = raw.parse()
    answer = completion.choices[0].message
    assert answer.role == "assistant" and "routes gRPC calls" in answer.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    usage = completion.usage
    assert usage.prompt_tokens > len(QUESTION.split()) and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extra = completion.model_extra["switchboard"]
    assert completion.model == extra["model"] == raw.headers["x-switchboard-model"]
    assert extra["backend"] == raw.headers["x-switchboard-backend"] and extra["backend"]
    assert extra["tier"] == raw.headers["x-switchboard-tier"] == "small"
    assert extra["citations"][0]["source_id"] == "messages[0]"


@pytest.mark.parametrize(
    ("model", "served"),
    [("small", "generator_small"), ("large", "generator_large"), ("generator_large", None)],
)
def test_model_names_a_model_or_a_tier(client: openai.OpenAI, model: str, served) -> None:
    completion = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8)
    assert completion.model == (served or model)
    assert completion.usage.completion_tokens <= 8


def test_a_sync_stream_ends_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="small", messages=MESSAGES)
    stream = client.chat.completions.create(
        model="small", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["stop"]
    assert finish[0].model == "generator_small"
    assert finish[0].model_extra["switchboard"]["backend"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_a_stop_sequence_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="small", messages=MESSAGES)
    text = whole.choices[0].message.content
    stop = "gRPC"  # the answer quotes "It routes gRPC calls by service name."
    assert text.index(stop) > 0
    stopped = client.chat.completions.create(model="small", messages=MESSAGES, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # the generation ended there: fewer tokens than the whole answer's
    assert 0 < stopped.usage.completion_tokens < whole.usage.completion_tokens
    stream = client.chat.completions.create(
        model="small", messages=MESSAGES, stop=stop, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == text[: text.index(stop)]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="small", messages=MESSAGES, stop=["a"] * 5)
    assert refused.value.param == "stop"


async def test_the_async_client_completes_and_streams(aclient: openai.AsyncOpenAI) -> None:
    whole = await aclient.chat.completions.create(model="large", messages=MESSAGES)
    stream = await aclient.chat.completions.create(model="large", messages=MESSAGES, stream=True)
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.model == "generator_large"


async def test_text_completions(aclient: openai.AsyncOpenAI) -> None:
    completion = await aclient.completions.create(model="small", prompt="Say hello")
    assert completion.object == "text_completion" and completion.choices[0].text
    assert completion.usage.completion_tokens > 0
    stream = await aclient.completions.create(model="small", prompt="Say hello", stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == completion.choices[0].text


async def test_embeddings_match_the_grpc_path(aclient: openai.AsyncOpenAI, grpc_channel, tenant):
    texts = ["a cat on the sofa", "a kitten on the couch"]
    as_floats = await aclient.embeddings.create(
        model="embedder", input=texts, encoding_format="float"
    )
    as_base64 = await aclient.embeddings.create(model="embedder", input=texts)  # SDK default
    reply = await inference_service_pb2_grpc.InferenceServiceStub(grpc_channel).Embed(
        inference_pb2.EmbedRequest(texts=texts), metadata=as_tenant(tenant), timeout=30
    )
    for got in (as_floats, as_base64):
        assert [d.index for d in got.data] == [0, 1] and got.model == "embedder"
        for ours, theirs in zip(got.data, reply.embeddings, strict=True):
            assert len(ours.embedding) == 384
            assert ours.embedding == pytest.approx(list(theirs.values), abs=1e-6)
        assert got.usage.prompt_tokens == reply.usage.prompt_tokens > 0


def test_a_session_stays_on_its_backend(client: openai.OpenAI) -> None:
    session = uuid.uuid4().hex
    backends = {
        client.chat.completions.create(
            model="small", messages=MESSAGES, extra_headers={"x-session-id": session}
        ).model_extra["switchboard"]["backend"]
        for _ in range(4)
    }
    assert len(backends) == 1


def test_the_node_openai_package_works_too(base_url: str, tenant: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (>= 18) is not installed")
    if not (NODE_CLIENT.parent / "node_modules" / "openai").is_dir():
        pytest.fail("the Node client's packages are missing: npm ci --prefix clients/node")
    run = subprocess.run(
        [node, str(NODE_CLIENT), "--base-url", base_url, "--api-key", key_of(tenant)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stderr
    lines = {line["kind"]: line for line in map(json.loads, run.stdout.splitlines())}
    assert "generator_small" in lines["models"]["ids"]
    completion, stream = lines["completion"], lines["stream"]
    assert "routes gRPC calls" in completion["text"] and completion["finish_reason"] == "stop"
    assert stream["text"] == completion["text"] and stream["chunks"] > 1
    assert stream["usage"] == completion["usage"] and completion["usage"]["completion_tokens"]
    assert stream["switchboard"]["model"] == completion["model"]
    assert (lines["embeddings"]["count"], lines["embeddings"]["dimensions"]) == (2, 384)
    assert lines["expected_error"]["status"] == 404
    assert lines["expected_error"]["code"] == "MODEL_NOT_FOUND"

    refused = subprocess.run(
        [node, str(NODE_CLIENT), "--base-url", base_url, "--api-key", "sb_0_nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 1
    (error,) = map(json.loads, refused.stdout.splitlines())
    assert (error["status"], error["code"]) == (401, "API_KEY_INVALID")


# -- the wire: SSE framing, HTTP/2 ---------------------------------------------------------


async def test_the_stream_is_sse_ending_with_done(http, base_url: str, tenant: str) -> None:
    body = {"model": "small", "messages": MESSAGES, "stream": True}
    body["stream_options"] = {"include_usage": True}
    async with http.post(
        f"{base_url}/chat/completions", json=body, headers=headers(tenant)
    ) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in sse_lines(response)]
    assert lines[-1] == "data: [DONE]"
    events = data_events(lines)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[-1]["usage"]["total_tokens"] > 0 and events[-1]["choices"] == []
    assert all(line.startswith(("data: ", ": ")) for line in lines)


def test_http2_reaches_the_api_on_the_same_port(base_url: str, tenant: str) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    run = subprocess.run(
        [curl, "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version}", f"{base_url}/models"]
        + ["-H", f"authorization: Bearer {key_of(tenant)}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, version = run.stdout.rsplit("\n", 1)
    assert version == "2", run.stderr
    assert json.loads(body)["object"] == "list"


# -- admission: refusals, queueing, cancellation -------------------------------------------


async def set_policy(channel, tenant: str, **fields) -> None:
    await admission_service_pb2_grpc.AdmissionServiceStub(channel).UpdatePolicy(
        admission_pb2.UpdatePolicyRequest(
            policy=admission_pb2.Policy(tenant_id=tenant, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
        ),
        metadata=as_operator(tenant),
        timeout=5,
    )


async def quota(channel, tenant: str) -> admission_pb2.QuotaStatus:
    reply = await admission_service_pb2_grpc.AdmissionServiceStub(channel).GetQuota(
        admission_pb2.GetQuotaRequest(), metadata=as_tenant(tenant), timeout=5
    )
    return reply.quota


async def test_a_refusal_is_429_with_retry_after(http, base_url, tenant, grpc_channel) -> None:
    await set_policy(grpc_channel, tenant, requests_per_second=0.01, request_burst=1)
    url = f"{base_url}/chat/completions"
    body = {"model": "small", "messages": MESSAGES}
    async with http.post(url, json=body, headers=headers(tenant)) as first:
        assert first.status == 200
    # a wait for the next request (100 s) past the call's deadline (5 s) is refused at once
    deadline = {"x-switchboard-timeout": "5"}
    for stream in (False, True):
        async with http.post(
            url, json={**body, "stream": stream}, headers=headers(tenant, **deadline)
        ) as refused:
            assert refused.status == 429
            assert int(refused.headers["retry-after"]) >= 60
            error = (await refused.json())["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "QUOTA_EXCEEDED")
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key_of(tenant), max_retries=0, timeout=5)
    async with client:  # the SDK's read timeout is the call's deadline
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(**body)
    assert caught.value.code == "QUOTA_EXCEEDED"


async def test_a_queued_stream_shows_its_position_as_comments(
    http, base_url, tenant, grpc_channel
) -> None:
    await set_policy(grpc_channel, tenant, max_in_flight=1)
    url = f"{base_url}/chat/completions"
    async with http.post(url, json={**LONG, "stream": True}, headers=headers(tenant)) as holder:
        assert holder.status == 200
        held = sse_lines(holder)
        assert (await anext(held)).startswith("data: ")  # admitted: it holds the one slot
        async with http.post(
            url,
            json={**LONG, "stream": True, "max_tokens": 5},
            headers=headers(tenant, **{"x-switchboard-timeout": "60"}),
        ) as waiter:
            assert waiter.status == 200
            waiting = sse_lines(waiter)
            assert await anext(waiting) == ": queue position 0"
            holder.close()  # the slot is freed: the waiter is admitted and answered
            rest = [line async for line in waiting]
    events = data_events(rest)
    assert rest[-1] == "data: [DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_a_client_that_disconnects_cancels_generation_and_frees_admission(
    mesh, http, base_url, tenant, grpc_channel
) -> None:
    async def outstanding() -> int:
        """Generations in flight in the router serving the HTTP API."""
        async with http.get(f"{base_url}/models", headers=headers(tenant)) as reply:
            models = (await reply.json())["data"]
        return sum(b["outstanding"] for m in models for b in m["switchboard"]["backends"])

    cancelled_before = _cancelled_in_triton(mesh)
    response = await http.post(
        f"{base_url}/chat/completions", json={**LONG, "stream": True}, headers=headers(tenant)
    )
    lines = sse_lines(response)
    events = 0
    while events < 3:
        events += (await anext(lines)).startswith("data: {")
    assert (await quota(grpc_channel, tenant)).in_flight == 1
    assert await outstanding() >= 1
    response.close()  # the client goes away mid-answer

    async def released() -> bool:
        return (await quota(grpc_channel, tenant)).in_flight == 0 and await outstanding() == 0

    await eventually(released, timeout=1.0, what="admission released and generation stopped")
    await eventually(
        lambda: _cancelled_in_triton(mesh) > cancelled_before,
        timeout=5,
        interval=0.1,
        what="Triton saw the request cancelled",
    )


def _cancelled_in_triton(mesh) -> int:
    """Streams the generator models stopped because their request was cancelled."""
    logs = (mesh.config.run_dir / "logs").glob("triton-*.log")
    return sum(p.read_text(errors="replace").count("tokens: cancelled") for p in logs)


# -- bad input and bad keys ----------------------------------------------------------------


async def post_raw(http, url: str, data: object, hdrs: dict[str, str]) -> tuple[int, dict]:
    async with http.post(url, data=data, headers=hdrs) as response:
        assert response.headers["content-type"].startswith("application/json")
        return response.status, (await response.json())["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "small", "messages": [', "body"),
        ('["not", "an", "object"]', "body"),
        ('{"messages": []}', "messages"),
        ('{"messages": [{"role": "user", "content": ""}]}', "messages[0].content"),
        ('{"messages": [{"role": "user", "content": 42}]}', "messages[0].content"),
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
        # checked by InferenceService's contract, named back as the request's parameter
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "hi"}], "temperature": 7}', "temperature"),
    ],
)
async def test_malformed_requests_are_400_naming_the_parameter(
    http, base_url, tenant, body: str, param: str
) -> None:
    status, error = await post_raw(
        http,
        f"{base_url}/chat/completions",
        body,
        headers(tenant, **{"content-type": "application/json"}),
    )
    assert status == 400
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "INVALID_REQUEST",
        param,
    )
    assert error["message"]


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=MESSAGES)
    assert caught.value.code == "MODEL_NOT_FOUND"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="a cat")


def test_empty_messages_are_refused_by_the_client_path_too(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="auto", messages=[])
    assert caught.value.code == "INVALID_REQUEST" and caught.value.param == "messages"


async def test_an_oversized_body_is_413_before_it_is_read_whole(http, base_url, tenant) -> None:
    huge = json.dumps({"messages": [{"role": "user", "content": "a" * (3 << 20)}]}).encode()
    status, error = await post_raw(
        http, f"{base_url}/chat/completions", io.BytesIO(huge), headers(tenant)
    )
    assert (status, error["code"]) == (413, "MESSAGE_TOO_LARGE")

    async def chunked():  # no Content-Length: refused once past the limit
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(48):
            yield b"a" * (64 << 10)
        yield b'"}]}'

    status, error = await post_raw(http, f"{base_url}/embeddings", chunked(), headers(tenant))
    assert (status, error["code"]) == (413, "MESSAGE_TOO_LARGE")


@pytest.mark.parametrize(
    ("key_headers", "reason"),
    [
        ({}, "API_KEY_MISSING"),
        ({"authorization": "Bearer sb_0123456789ab_wrong"}, "API_KEY_INVALID"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "API_KEY_MISSING"),
    ],
)
async def test_the_edge_refuses_a_missing_or_invalid_key_as_json(
    http, base_url, key_headers, reason
) -> None:
    for method, path in (("GET", "/models"), ("POST", "/chat/completions")):
        async with http.request(
            method, f"{base_url}{path}", json={"messages": MESSAGES}, headers=key_headers
        ) as response:
            assert response.status == 401
            assert response.headers["content-type"] == "application/json"
            error = (await response.json())["error"]
        assert (error["type"], error["code"]) == ("authentication_error", reason)


def test_the_sdk_sees_a_bad_key_as_an_authentication_error(base_url: str) -> None:
    bad = openai.OpenAI(base_url=base_url, api_key="sb_0123456789ab_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model="auto", messages=MESSAGES)
    assert caught.value.code == "API_KEY_INVALID"


async def test_an_operator_credential_reaches_no_generation(http, base_url, tenant) -> None:
    operator = dict(as_operator(tenant))
    status, error = await post_raw(
        http, f"{base_url}/chat/completions", json.dumps({"messages": MESSAGES}), operator
    )
    assert (status, error["code"]) == (403, "PRINCIPAL_NOT_ALLOWED")


async def test_a_client_chosen_tenant_header_is_ignored(
    http, base_url, tenant, grpc_channel
) -> None:
    victim = new_tenant()
    async with http.post(
        f"{base_url}/chat/completions",
        json={**LONG, "stream": True},
        headers=headers(tenant, **{"x-tenant-id": victim}),
    ) as response:
        assert response.status == 200
        assert (await anext(sse_lines(response))).startswith("data: ")
        # the generation holds a lease of the key's tenant, none of the header's
        assert (await quota(grpc_channel, tenant)).in_flight == 1
        assert (await quota(grpc_channel, victim)).in_flight == 0
