"""`switchboard chat`: an interactive terminal chat against the running mesh.

Creates a session (or opens an existing one), then reads lines from stdin and sends
each as a user message over one Converse stream through Envoy, printing the answer's
tokens as they stream, then its sources and usage. Lines starting with `/` are
commands: `/cancel` stops the answer being generated, `/quit` (or end of input) ends
the conversation once the answers in progress are done; `/tool NAME {json}` and
`/code` lines are sent as they are (the session's settings decide whether they run).

`render` turns server frames into the transcript lines `make demo` prints too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import json_format
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2_grpc
from switchboard.events.v1 import events_pb2

KEY_ENV = "SWITCHBOARD_API_KEY"
_STATUS = {
    pb.MESSAGE_STATUS_COMPLETED: "completed",
    pb.MESSAGE_STATUS_CANCELLED: "cancelled",
    pb.MESSAGE_STATUS_FAILED: "failed",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", default="", help=f"the tenant's API key (default: ${KEY_ENV})")
    parser.add_argument("--session", default="", help="continue this session instead")
    parser.add_argument("--collection", default="", help="RAG collection to answer from")
    parser.add_argument("--tools", default="", help="tools the session may call, comma separated")
    parser.add_argument("--code", action="store_true", help="allow /code (sandboxed Python)")
    parser.add_argument("--system", default="", help="system prompt")
    parser.add_argument("--target", default="", help="Envoy address (default: the local mesh)")


def render(frame: pb.ConverseResponse) -> str:
    """A frame as transcript text ("" for frames that print nothing)."""
    kind = frame.WhichOneof("frame")
    if kind == "token":
        return str(frame.token.text)
    if kind == "queued":
        wait = frame.queued.estimated_wait.ToTimedelta().total_seconds()
        return f"[queued: position {frame.queued.position}, about {wait:.1f}s]\n"
    if kind == "tool_call":
        args = json_format.MessageToJson(frame.tool_call.arguments, indent=None)
        return f"[tool {frame.tool_call.tool} {args} → task {frame.tool_call.task_id}]\n"
    if kind == "tool_progress":
        event = frame.tool_progress.event
        name = events_pb2.StepEventType.Name(event.type).removeprefix("STEP_EVENT_TYPE_")
        return f"[  step {event.step_name}: {name.lower()} (attempt {event.attempt})]\n"
    if kind == "citations":
        # the passages are chunks, and one document may give several: a source is a document
        passages = frame.citations.passages
        documents = list(dict.fromkeys(p.document_id for p in passages))
        cited = {
            passages[c.passage_index].document_id
            for c in frame.citations.citations
            if 0 <= c.passage_index < len(passages)
        }
        lines = [
            f"  [{i + 1}] {d}" + (" (cited)" if d in cited else "") for i, d in enumerate(documents)
        ]
        return "\nsources:\n" + "\n".join(lines) + "\n"
    if kind == "turn_completed":
        done = frame.turn_completed
        usage = done.usage
        return (
            f"\n[{_STATUS.get(done.status, 'ended')}: {usage.prompt_tokens} prompt +"
            f" {usage.completion_tokens} completion tokens, {done.model.name or 'no model'}]\n"
        )
    if kind == "error":
        status = frame.error.status
        return f"\n[error {grpc.StatusCode(_code(status.code)).name}: {status.message}]\n"
    if kind == "settings_changed":
        return "[settings changed]\n"
    return ""


def _code(number: int) -> tuple[int, str]:
    return next(c.value for c in grpc.StatusCode if c.value[0] == number)


async def _lines(read: Callable[[], str]) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, read)
        if not line:
            return
        yield line.rstrip("\n")


async def chat(args: argparse.Namespace, default_target: str) -> int:
    key = args.key or os.environ.get(KEY_ENV, "")
    if not key:
        print(
            f"switchboard chat: an API key is needed: pass --key or set ${KEY_ENV}"
            " (create one with `switchboard keys create --tenant NAME`)",
            file=sys.stderr,
        )
        return 2
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(args.target or default_target) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        try:
            if args.session:
                session_id = args.session
            else:
                settings = pb.SessionSettings(
                    system_prompt=args.system,
                    collection=args.collection,
                    allowed_tools=[t for t in args.tools.split(",") if t],
                    code_enabled=args.code,
                )
                reply = await stub.CreateSession(
                    pb.CreateSessionRequest(title="terminal chat", settings=settings),
                    metadata=metadata,
                    timeout=10,
                )
                session_id = reply.session.session_id
            return await _converse(stub, metadata, session_id)
        except grpc.aio.AioRpcError as error:
            print(f"\nswitchboard chat: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1


async def _converse(stub, metadata, session_id: str) -> int:
    interactive = sys.stdin.isatty()
    sent: dict[str, str] = {}

    async def frames() -> AsyncIterator[pb.ConverseRequest]:
        yield pb.ConverseRequest(open=pb.OpenSession(session_id=session_id))
        number = 0
        async for line in _lines(sys.stdin.readline):
            if line.strip() in ("/quit", "/exit"):
                return
            if line.strip() == "/cancel":
                yield pb.ConverseRequest(cancel=pb.CancelTurn())
            elif line.strip():
                number += 1
                sent[f"line-{number}"] = line
                yield pb.ConverseRequest(
                    message=pb.UserMessage(client_message_id=f"line-{number}", text=line)
                )

    call = stub.Converse(frames(), metadata=metadata)
    async for frame in call:
        if frame.HasField("opened"):
            print(
                f"session {frame.opened.session.session_id}"
                " (type a message; /cancel stops an answer, /quit ends)",
                flush=True,
            )
        elif frame.HasField("turn_started"):
            said = sent.pop(frame.turn_started.client_message_id, "")
            echo = "" if interactive else f"\nyou> {said}\n"
            print(f"{echo}assistant> ", end="", flush=True)
        print(render(frame), end="", flush=True)
    return 0
