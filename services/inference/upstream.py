"""A generator served by an OpenAI-compatible HTTP endpoint instead of Triton.

A tier in `models.yaml` may name an `upstream` (vLLM, Ollama, a hosted API, another
Switchboard's HTTP API): its generations stream from that endpoint's
`/chat/completions`, through the official `openai` client, with the same breaker,
fallback, admission and deadlines as a Triton backend. The router sees it as one more
backend of that model alone.

The prompt's passages travel as system messages, one each, before the prompt; an
upstream does not say which passage a token came from, so its tokens carry no
citation. Each streamed chunk of text counts as one completion token, as a Triton token
does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import openai

from services.inference.breaker import BackendBreaker
from services.inference.triton import GENERATION_IDLE, BackendFailure, StreamedToken, StreamWaits
from services.runtime import DeadlineExceeded, Internal, SwitchboardError

logger = logging.getLogger(__name__)

KINDS = ("openai",)
"""The upstream kinds `models.yaml` knows."""
_RETRYABLE_STATUS = {408, 409, 429}
"""HTTP statuses (besides 5xx) after which another backend or tier may serve the call."""


@dataclass(frozen=True)
class Upstream:
    """Where a generator is served when it is not served by Triton (`upstream:` in
    `models.yaml`)."""

    base_url: str
    """The endpoint's OpenAI API root, e.g. `http://127.0.0.1:8000/v1`."""
    model: str
    """The model's name at the upstream."""
    api_key_env: str = ""
    """The environment variable holding the upstream's API key (never the key itself:
    `models.yaml` is configuration, not a secret store); empty = no key."""
    kind: str = "openai"

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, generator: str) -> Upstream:
        """An `upstream:` entry of a generator.

        Raises:
            ValueError: an unknown kind, or no `base_url`.
        """
        kind = raw.get("kind", "openai")
        if kind not in KINDS:
            raise ValueError(f"generator {generator!r}: unknown upstream kind {kind!r} ({KINDS})")
        base_url = raw.get("base_url")
        if not base_url or not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"generator {generator!r}: upstream needs an http(s) base_url")
        return cls(
            base_url=str(base_url).rstrip("/"),
            model=str(raw.get("model") or generator),
            api_key_env=str(raw.get("api_key_env") or ""),
            kind=kind,
        )

    def api_key(self) -> str:
        """The key to send ("-" when none is configured: the client requires a value).

        Raises:
            ValueError: `api_key_env` names a variable that is not set.
        """
        if not self.api_key_env:
            return "-"
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"upstream {self.base_url}: ${self.api_key_env} is not set")
        return key


def upstream_messages(prompt: str, passages: Sequence[str]) -> list[dict[str, str]]:
    """The chat messages a generation becomes: each passage as a system message of its
    own, in order, then the prompt as the user's message (an OpenAI-compatible endpoint
    in front of an extractive model, such as Switchboard's own, reads them back as the
    same passages)."""
    messages = [{"role": "system", "content": passage} for passage in passages]
    messages.append({"role": "user", "content": prompt})
    return messages


def translate(error: openai.OpenAIError, backend: str) -> SwitchboardError:
    """An upstream's failure as the router's vocabulary: BackendFailure where another
    backend or tier may serve the call (connection, 5xx, 408/409/429), else Internal."""
    metadata = {"backend": backend}
    if isinstance(error, openai.APITimeoutError):
        return DeadlineExceeded(
            "the upstream model did not answer before the deadline",
            reason="DEADLINE_EXCEEDED",
            metadata=metadata,
        )
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if status >= 500 or status in _RETRYABLE_STATUS:
            return BackendFailure(f"backend {backend}: HTTP {status}", metadata=metadata)
        return Internal(f"backend {backend} rejected the call: HTTP {status}", metadata=metadata)
    if isinstance(error, openai.APIConnectionError):
        return BackendFailure(f"backend {backend}: {error}", metadata=metadata)
    return Internal(f"backend {backend}: {type(error).__name__}", metadata=metadata)


class OpenAIBackend:
    """One OpenAI-compatible endpoint serving one generator: its client, outstanding
    calls, breaker and readiness (the router's backend interface, as `TritonBackend`)."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        breaker_fail_max: int = 3,
        breaker_reset: timedelta = timedelta(seconds=5),
        generation_idle: timedelta = GENERATION_IDLE,
    ) -> None:
        self.upstream = upstream
        self.name = f"{upstream.base_url}#{upstream.model}"
        self.address = upstream.base_url
        self.generation_idle = generation_idle.total_seconds()
        self.outstanding = 0
        self.ready = False
        self.breaker = BackendBreaker(self.name, fail_max=breaker_fail_max, reset=breaker_reset)
        # retries are the router's (next backend, next tier), not the client's
        self._client = openai.AsyncOpenAI(
            base_url=upstream.base_url, api_key=upstream.api_key(), max_retries=0
        )

    def accepting(self) -> bool:
        return self.breaker.state != "open"

    async def close(self) -> None:
        await self._client.close()

    async def check_ready(self, models: Sequence[str] = (), timeout: float = 1.0) -> bool:
        """The endpoint answers its model list and lists this generator's model."""
        try:
            page = await self._client.models.list(timeout=timeout)
            ok = any(m.id == self.upstream.model for m in page.data)
        except openai.OpenAIError:
            ok = False
        if ok != self.ready:
            log = logger.info if ok else logger.warning
            log("upstream %s", "ready" if ok else "not ready", extra={"backend": self.name})
        self.ready = ok
        return ok

    async def generate(
        self,
        model: str,
        prompt: str,
        passages: Sequence[str],
        max_tokens: int,
        *,
        timeout: float | None,
    ) -> AsyncIterator[StreamedToken]:
        """Streams the upstream's answer; closing the iteration closes the HTTP stream
        (the upstream sees the client go and stops). Each wait is bounded as a Triton
        backend's (`StreamWaits`)."""
        self.outstanding += 1
        stream = None
        waits = StreamWaits(self.name, timeout, self.generation_idle)
        try:
            async with asyncio.timeout_at(waits.next()):
                stream = await self._client.chat.completions.create(
                    model=self.upstream.model,
                    messages=upstream_messages(prompt, passages),  # type: ignore[arg-type]
                    max_tokens=max_tokens,
                    stream=True,
                    timeout=timeout,
                )
            chunks = aiter(stream)
            while True:
                async with asyncio.timeout_at(waits.next()):
                    chunk = await anext(chunks, None)
                if chunk is None:
                    return
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield StreamedToken(choice.delta.content, -1)
        except openai.OpenAIError as error:
            raise translate(error, self.name) from None
        except TimeoutError:
            raise waits.expired("upstream model") from None
        finally:
            self.outstanding -= 1
            if stream is not None:
                await stream.close()
