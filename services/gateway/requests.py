"""OpenAI request bodies → InferenceService requests (pure: no I/O).

Chat messages map onto `Generate`'s prompt and context: the last `user` message is the
prompt, and every other message with text (system and developer instructions, earlier
turns, tool results) is a context passage, in order, `source_id` `messages[i]`. The
contract allows 64 passages: system and developer messages are kept, then the most
recent others. `model` names a model, a tier (`small`, `large`) or `auto` (the router
chooses). Shapes and types are checked here (400 with the parameter named); values the
contract bounds (max_tokens, temperature, sizes) are checked by InferenceService itself,
and its field violations are named back as the request's parameters (`param_names`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from switchboard.common.v1 import common_pb2
from switchboard.inference.v1 import inference_pb2

from services.runtime import TIER_VALUES, FieldViolation, invalid

logger = logging.getLogger(__name__)

AUTO = "auto"
"""The `model` that lets the router choose (as does no model at all)."""
MAX_PASSAGES = 64
"""`GenerateRequest.context`'s bound in the contract."""
_INT32 = range(-(2**31), 2**31)
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_INSTRUCTIONS = frozenset({"system", "developer"})
_TEXT_PARTS = frozenset({"text", "input_text"})
_INDEX = re.compile(r"\[\d+\]")


@dataclass(frozen=True)
class GenerateCall:
    """A chat or text completion request, as a Generate call and how to answer it."""

    request: inference_pb2.GenerateRequest
    model: str
    """The `model` as the client sent it (echoed until the serving model is known)."""
    stream: bool = False
    include_usage: bool = False
    """`stream_options.include_usage`: a last chunk with the usage, before `[DONE]`."""


@dataclass(frozen=True)
class EmbedCall:
    request: inference_pb2.EmbedRequest
    base64: bool = False
    """`encoding_format: base64`: each vector as base64 of little-endian float32."""
    dimensions: int | None = None
    """The length the client expects, if it said (the embedder's own is the only one)."""


def param_names(prompt: str) -> Callable[[str], str]:
    """Names a field violation of InferenceService (`parameters.max_tokens`,
    `context[3].text`) after the request parameter it came from; `prompt` is the
    parameter that became the prompt (`messages` or `prompt`)."""
    fields = {
        "prompt": prompt,
        "context.text": "messages",
        "context": "messages",
        "parameters.max_tokens": "max_tokens",
        "parameters.temperature": "temperature",
        "parameters.stop": "stop",
        "session_id": "user",
        "model": "model",
        "tier": "model",
        "texts": "input",
    }

    def name(path: str) -> str:
        return fields.get(_INDEX.sub("", path), path)

    return name


class _Checker:
    """Collects every violation of one body, so the client hears of all at once."""

    def __init__(self, body: object) -> None:
        self.violations: list[FieldViolation] = []
        if not isinstance(body, dict):
            self.fail("body", "must be a JSON object")
            body = {}
        self.body: Mapping[str, Any] = body

    def fail(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def get(self, name: str, kind: type | tuple[type, ...], what: str) -> Any:
        """The field's value when it has the type (None when absent or null)."""
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.fail(name, f"must be {what}")
            return None
        if not isinstance(value, kind):
            self.fail(name, f"must be {what}")
            return None
        return value

    def integer(self, name: str) -> int | None:
        value = self.get(name, int, "an integer")
        if value is not None and value not in _INT32:
            self.fail(name, "is out of range")
            return None
        return value

    def check(self) -> None:
        if self.violations:
            raise invalid(self.violations)


def route(model: str) -> tuple[str, int]:
    """(model name, tier) for Generate: `auto` or nothing chooses, a tier name pins."""
    if model in ("", AUTO):
        return "", common_pb2.MODEL_TIER_UNSPECIFIED
    if model in TIER_VALUES:
        return "", TIER_VALUES[model]
    return model, common_pb2.MODEL_TIER_UNSPECIFIED


def chat_call(body: object, *, session_id: str = "") -> GenerateCall:
    """`POST /v1/chat/completions`.

    Raises:
        InvalidArgument: the body is malformed (every violation listed).
    """
    checker = _Checker(body)
    if checker.body.get("messages") is None:
        checker.fail("messages", "is required")
    messages = checker.get("messages", list, "an array of messages")
    if messages == []:
        checker.fail("messages", "must not be empty")
    texts: list[tuple[int, str, str]] = []
    for index, message in enumerate(messages or ()):
        read = _message(checker, index, message)
        if read is not None:
            texts.append((index, *read))
    users = [i for i, (_, role, _) in enumerate(texts) if role == "user"]
    if messages and not users and not checker.violations:
        checker.fail("messages", "must hold a user message")
    elif users and not texts[users[-1]][2].strip():
        checker.fail(f"messages[{texts[users[-1]][0]}].content", "must not be empty")
    call = _generation(checker, session_id=session_id)
    checker.check()
    last = users[-1]
    call.request.prompt = texts[last][2]
    call.request.context.extend(_passages([t for i, t in enumerate(texts) if i != last]))
    return call


def completion_call(body: object, *, session_id: str = "") -> GenerateCall:
    """`POST /v1/completions`: the prompt alone (one string, or a list of one).

    Raises:
        InvalidArgument: the body is malformed.
    """
    checker = _Checker(body)
    prompt = checker.body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if prompt is None:
        checker.fail("prompt", "is required")
    elif isinstance(prompt, list):
        checker.fail("prompt", "must be one string: a batch of prompts is not supported")
    elif not isinstance(prompt, str):
        checker.fail("prompt", "must be a string")
    elif not prompt.strip():
        checker.fail("prompt", "must not be empty")
    call = _generation(checker, session_id=session_id)
    checker.check()
    call.request.prompt = prompt
    return call


def embed_call(body: object) -> EmbedCall:
    """`POST /v1/embeddings`.

    Raises:
        InvalidArgument: the body is malformed.
    """
    checker = _Checker(body)
    raw = checker.body.get("input")
    texts: list[str] = []
    if raw is None:
        checker.fail("input", "is required")
    elif isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        texts = raw
    elif isinstance(raw, list) and not raw:
        checker.fail("input", "must not be empty")
    elif isinstance(raw, list) and all(isinstance(t, int | list) for t in raw):
        checker.fail("input", "token arrays are not supported: send text")
    else:
        checker.fail("input", "must be a string or an array of strings")
    model = checker.get("model", str, "a string") or ""
    encoding = checker.get("encoding_format", str, "a string")
    if encoding not in (None, "float", "base64"):
        checker.fail("encoding_format", "must be float or base64")
    dimensions = checker.integer("dimensions")
    checker.check()
    return EmbedCall(
        request=inference_pb2.EmbedRequest(texts=texts, model="" if model == AUTO else model),
        base64=encoding == "base64",
        dimensions=dimensions,
    )


def _generation(checker: _Checker, *, session_id: str) -> GenerateCall:
    """The fields chat and text completions share."""
    model = checker.get("model", str, "a string") or ""
    stream = bool(checker.get("stream", bool, "a boolean"))
    options = checker.get("stream_options", dict, "an object") or {}
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        checker.fail("stream_options.include_usage", "must be a boolean")
    max_tokens = checker.integer("max_completion_tokens")
    if max_tokens is None:
        max_tokens = checker.integer("max_tokens")
    temperature = checker.get("temperature", int | float, "a number")
    n = checker.integer("n")
    if n not in (None, 1):
        checker.fail("n", "only one choice (n = 1) is supported")
    user = checker.get("user", str, "a string") or ""
    stop = checker.body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and not (
        isinstance(stops, list) and all(isinstance(s, str) for s in stops)
    ):
        checker.fail("stop", "must be a string or an array of strings")
        stops = None
    name, tier = route(model)
    request = inference_pb2.GenerateRequest(
        model=name,
        tier=tier,
        session_id=session_id or user,
        report_queue_position=stream,
    )
    if max_tokens is not None and max_tokens in _INT32:
        request.parameters.max_tokens = max_tokens
    if temperature is not None:
        request.parameters.temperature = float(temperature)
    request.parameters.stop.extend(stops or ())  # its bounds are the contract's
    return GenerateCall(
        request=request, model=model or AUTO, stream=stream, include_usage=bool(include_usage)
    )


def _message(checker: _Checker, index: int, message: object) -> tuple[str, str] | None:
    """(role, text) of one chat message; None when it is malformed (noted)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        checker.fail(where, "must be an object")
        return None
    role = message.get("role")
    if role not in _ROLES:
        checker.fail(f"{where}.role", f"must be one of {', '.join(sorted(_ROLES))}")
        return None
    content = message.get("content")
    if content is None and role in ("assistant", "function", "tool"):
        return role, ""  # a tool call without text
    if isinstance(content, str):
        return role, content
    if not isinstance(content, list):
        checker.fail(f"{where}.content", "must be a string or an array of text parts")
        return None
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            checker.fail(f"{where}.content[{j}]", "only text parts are supported")
        elif not isinstance(part.get("text"), str):
            checker.fail(f"{where}.content[{j}].text", "must be a string")
        else:
            parts.append(part["text"])
    return role, "\n".join(parts)


def _passages(texts: list[tuple[int, str, str]]) -> list[inference_pb2.Passage]:
    """The context: instructions first kept, then the most recent others, in order."""
    with_text = [(i, role, text) for i, role, text in texts if text.strip()]
    kept = {i for i, role, _ in with_text if role in _INSTRUCTIONS}
    for i, _, _ in reversed(with_text):
        if len(kept) >= MAX_PASSAGES:
            break
        kept.add(i)
    return [
        inference_pb2.Passage(source_id=f"messages[{i}]", text=text)
        for i, _, text in with_text
        if i in kept
    ]
