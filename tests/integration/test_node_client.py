"""A client in another language: the Node.js client in clients/node (stubs loaded from
proto/ by @grpc/proto-loader, calls made by @grpc/grpc-js) holds a Converse session
through Envoy, drops it mid-answer and resumes it; the history it leaves is checked with
the generated Python client."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
from google.rpc import status_pb2
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2_grpc
from switchboard.rag.v1 import rag_service_pb2_grpc

from services.demo import handbook

ROOT = Path(__file__).parents[2]
CLIENT = ROOT / "clients" / "node" / "converse.mjs"
COLLECTION = "handbook"
GOOGLEAPIS = Path(status_pb2.__file__).parents[2]
"""Holds google/rpc/*.proto (googleapis-common-protos), as for scripts/gen.sh."""
QUESTIONS = ["How long is an on-call shift?", "Who approves expense reports?"]
RESUME_QUESTION = "Tell me everything about on-call, rotations and escalation"
LONG_ANSWERS = {
    "model": "generator_large",
    "parameters": {"max_tokens": 4000},
    "retrieval_top_k": 20,
}
"""Settings for the answer that is dropped and resumed: long enough to drop mid-way."""
DROP_AFTER = 3


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (>= 18) is not installed")
    if not (CLIENT.parent / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("the Node client's packages are missing: npm ci --prefix clients/node")
    return node


@pytest.fixture(scope="module")
def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
async def collection(envoy_target, credentials, tenant) -> str:
    """The handbook's first documents, for the session to retrieve from."""
    requests = handbook(COLLECTION, 6)
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        reply = await rag_service_pb2_grpc.RagServiceStub(channel).IngestDocuments(
            iter(requests), metadata=credentials.metadata(tenant), timeout=120
        )
    assert reply.documents_ingested == len(requests) and reply.documents_failed == 0
    return COLLECTION


async def run_client(node: str, *args: str, timeout: float = 90) -> tuple[int, list[dict], str]:
    """Runs the Node client; its exit status, its JSON lines and its stderr."""
    process = await asyncio.create_subprocess_exec(
        node,
        str(CLIENT),
        "--proto-path",
        str(GOOGLEAPIS),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    return process.returncode, lines, stderr.decode()


def received(lines: list[dict]) -> list[dict]:
    """The ConverseResponse frames, in the order both streams delivered them."""
    return [line for line in lines if "event_id" in line]


def turns(frames: list[dict]) -> dict[str, list[dict]]:
    """Each assistant message's frames, across streams."""
    by_message: dict[str, list[dict]] = defaultdict(list)
    for frame in frames:
        if frame["message_id"]:
            by_message[frame["message_id"]].append(frame)
    return by_message


def tokens(frames: list[dict]) -> list[dict]:
    return [f["token"] for f in frames if f["kind"] == "token"]


async def test_a_node_client_converses_drops_and_resumes_through_envoy(
    node, envoy_target, credentials, tenant, collection
):
    code, lines, stderr = await run_client(
        node,
        "--target",
        envoy_target,
        "--api-key",
        credentials.key(tenant),
        "--collection",
        collection,
        *(arg for question in QUESTIONS for arg in ("--question", question)),
        "--resume-question",
        RESUME_QUESTION,
        "--resume-settings",
        json.dumps(LONG_ANSWERS),
        "--drop-after",
        str(DROP_AFTER),
    )
    assert code == 0, f"the node client failed:\n{stderr}\n{lines[-3:]}"
    session = lines[0]["session"]
    assert lines[0]["kind"] == "session" and session["settings"]["collection"] == collection
    frames = received(lines)
    # every event has its own id; `opened` is no event: it carries the attach point
    ids = [f["event_id"] for f in frames if f["kind"] != "opened"]
    assert all(ids) and len(set(ids)) == len(ids)

    # stream 1: opened, then the questions' turns, one at a time, in order
    opened = frames[0]
    assert (opened["stream"], opened["kind"]) == (1, "opened")
    assert not opened["opened"]["resumed"]
    assert opened["opened"]["session"]["session_id"] == session["session_id"]
    started = [f["turn_started"] for f in frames if f["kind"] == "turn_started"]
    assert [s["client_message_id"] for s in started] == ["q1", "q2", "r1"]
    owners = [f["message_id"] for f in frames if f["message_id"]]
    assert [m for i, m in enumerate(owners) if i == 0 or owners[i - 1] != m] == [
        s["assistant_message_id"] for s in started
    ], "turns interleaved"
    # the second question went out while the first answer was streaming
    sent_q2 = next(
        i
        for i, line in enumerate(lines)
        if line.get("kind") == "sent" and line.get("message", {}).get("client_message_id") == "q2"
    )
    first_done = next(i for i, line in enumerate(lines) if line.get("kind") == "turn_completed")
    first_token = next(i for i, line in enumerate(lines) if line.get("kind") == "token")
    assert first_token < sent_q2 < first_done

    by_turn = turns(frames)
    for start in started:
        turn = by_turn[start["assistant_message_id"]]
        assert turn[0]["kind"] == "turn_started" and turn[-1]["kind"] == "turn_completed"
        done = turn[-1]["turn_completed"]
        assert done["status"] == "MESSAGE_STATUS_COMPLETED"
        assert done["assistant_message_id"] == start["assistant_message_id"]
        indices = [t["index"] for t in tokens(turn)]
        assert indices == list(range(len(indices))) and indices, "tokens out of order"
        assert done["usage"]["completion_tokens"] == len(indices)
        assert done["usage"]["prompt_tokens"] > 0

    # the settings change before the last question, answered on the stream
    changed = next(f for f in frames if f["kind"] == "settings_changed")
    assert changed["settings_changed"]["session"]["settings"]["model"] == "generator_large"

    # the drop and the resume: the answer continues on stream 2 without gap or repeat
    resumed_turn = by_turn[started[-1]["assistant_message_id"]]
    before = tokens([f for f in resumed_turn if f["stream"] == 1])
    after = tokens([f for f in resumed_turn if f["stream"] == 2])
    assert len(before) == DROP_AFTER and after, "the drop did not land mid-answer"
    assert [t["index"] for t in before + after] == list(range(len(before) + len(after)))
    (dropped,) = [line for line in lines if line.get("kind") == "dropped"]
    assert dropped["last_event_id"] == [f for f in frames if f["stream"] == 1][-1]["event_id"]
    second = [f for f in frames if f["stream"] == 2]
    assert second[0]["kind"] == "opened" and second[0]["opened"]["resumed"]
    assert second[0]["event_id"] == dropped["last_event_id"]
    assert second[-1]["kind"] == "turn_completed"
    ends = {line["stream"]: line["code"] for line in lines if line.get("kind") == "stream_end"}
    assert ends == {1: grpc.StatusCode.CANCELLED.value[0], 2: grpc.StatusCode.OK.value[0]}

    # the stored history is what the node client saw
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        reply = await chat_service_pb2_grpc.ChatServiceStub(channel).ListMessages(
            pb.ListMessagesRequest(session_id=session["session_id"]),
            metadata=credentials.metadata(tenant),
            timeout=10,
        )
    stored = list(reply.messages)
    assert [m.role for m in stored] == [pb.MESSAGE_ROLE_USER, pb.MESSAGE_ROLE_ASSISTANT] * 3
    questions = [*QUESTIONS, RESUME_QUESTION]
    assert [m.text for m in stored[::2]] == questions
    for start, user, answer in zip(started, stored[::2], stored[1::2], strict=True):
        turn = by_turn[start["assistant_message_id"]]
        done = turn[-1]["turn_completed"]
        assert user.message_id == start["user_message_id"]
        assert user.client_message_id == start["client_message_id"]
        assert answer.message_id == start["assistant_message_id"]
        assert answer.status == pb.MESSAGE_STATUS_COMPLETED
        assert answer.text == "".join(t["text"] for t in tokens(turn)) and answer.text
        assert answer.usage.completion_tokens == done["usage"]["completion_tokens"]
        assert answer.usage.prompt_tokens == done["usage"]["prompt_tokens"]
        assert answer.model.name == done["model"]["name"]


async def test_a_bad_key_is_unauthenticated_in_node_too(node, envoy_target):
    code, lines, stderr = await run_client(
        node, "--target", envoy_target, "--api-key", f"sb_{uuid.uuid4().hex}_nope", timeout=30
    )
    assert code == 1
    (error,) = lines
    assert error["kind"] == "rpc_error"
    assert error["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0] == 16
    assert error["reason"] == "API_KEY_INVALID" and error["domain"] == "switchboard.dev"
    assert "UNAUTHENTICATED (16)" in stderr
