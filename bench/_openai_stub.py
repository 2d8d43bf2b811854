"""`python -m bench._openai_stub`: a fast OpenAI-compatible model for gateway benchmarks;
prints its port.

GET /v1/models lists one model, `MODEL`; POST /v1/chat/completions answers `ANSWER`
at once, whole or streamed (SSE, one chunk per word, then `[DONE]`), whatever the
messages. It does no work, so a benchmark in front of it measures the gateway.
`started()` runs it in its own process for a benchmark.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from bench._common import stop_process

logger = logging.getLogger(__name__)

MODEL = "stub"
ANSWER = "Envoy routes each call to a cluster by its service name."
_PIECES = [f"{word} " for word in ANSWER.split(" ")[:-1]] + [ANSWER.split(" ")[-1]]


def answer(max_tokens: int) -> str:
    """The text answered for `max_tokens` (one token a word)."""
    return "".join(_PIECES[: max(1, max_tokens)])


async def _models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}],
        }
    )


def _usage(body: dict[str, Any], completion: int) -> dict[str, int]:
    messages = body.get("messages") or []
    prompt = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    head = {
        "id": f"chatcmpl-stub-{time.monotonic_ns()}",
        "created": int(time.time()),
        "model": body.get("model") or MODEL,
    }
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or len(_PIECES)
    pieces = _PIECES[: max(1, int(max_tokens))]
    finish = "stop" if len(pieces) == len(_PIECES) else "length"
    if not body.get("stream"):
        return web.json_response(
            {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(body, len(pieces)),
            }
        )
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        data = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n".encode()

    await response.write(chunk({"role": "assistant", "content": ""}))
    for piece in pieces:
        await response.write(chunk({"content": piece}))
    await response.write(chunk({}, finish))
    options = body.get("stream_options") or {}
    if options.get("include_usage"):
        usage = {**head, "object": "chat.completion.chunk", "choices": []}
        usage["usage"] = _usage(body, len(pieces))
        await response.write(f"data: {json.dumps(usage)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _main() -> None:
    app = web.Application()
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
    await asyncio.Event().wait()


@contextmanager
def started() -> Iterator[int]:
    """The stub in its own process; yields its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench._openai_stub"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        stop_process(process)


if __name__ == "__main__":
    asyncio.run(_main())
