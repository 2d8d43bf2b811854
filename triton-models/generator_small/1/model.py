"""Extractive streaming generator (Triton Python backend, decoupled).

Shared by both generator tiers: generator_large/1/model.py is a symlink to this file, and
the tier is chosen by the `scorer` parameter in each model's config.pbtxt:

- `lexical` (generator_small): BM25 over the context sentences. Fast.
- `semantic` (generator_large): MiniLM embeddings of the prompt, of every context sentence
  and of its window (the sentence with the one before it, which anchors pronouns),
  computed by calling the `embedder` model through BLS, blended with BM25 and picked by
  maximal marginal relevance. Slower, picks better sentences.

No language model is involved: the answer is the most relevant sentences of the supplied
passages, streamed word by word, each response carrying the word (`TEXT`) and the index of
the passage it came from (`PASSAGE`, -1 for the model's own fixed sentences). Without
context the model says, honestly, that it only answers from supplied passages.

Inputs: PROMPT (string [1]), CONTEXT (string [-1], optional: the passages), MAX_TOKENS
(int32 [1], optional: stop after that many tokens). Every response but the last carries
one token; the last token carries TRITONSERVER_RESPONSE_COMPLETE_FINAL (a cancelled or
empty stream ends with an empty final response).

Parameters (config.pbtxt, all strings):
- scorer: lexical | semantic
- max_sentences: how many sentences an answer has at most
- default_max_tokens: the limit when MAX_TOKENS is not sent
- token_delay_ms: sleep between tokens, to make streaming visible (0 = none)
- min_similarity: (semantic) cosine similarity below which a sentence is never picked
- embedder_model: (semantic) the model called through BLS for embeddings
- max_concurrent_streams: worker threads; further streams wait for a free worker

Each request is served on a worker thread: execute() returns at once, so one instance
streams several answers concurrently. Cancellation (client cancel, deadline, disconnect)
is checked between tokens with `response_sender.is_cancelled()` and ends the stream.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import extractive
import numpy as np
import triton_python_backend_utils as pb_utils

_EMBED_BATCH = 64  # the embedder's max_batch_size


def _log(level: str, message: str) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        getattr(logger, f"log_{level}")(message)
    else:  # older stubs: stdout ends up in the server log
        print(f"[generator] {level}: {message}", flush=True)


class _Cancelled(Exception):
    pass


class TritonPythonModel:
    """Streams the context sentences most relevant to the prompt, token by token."""

    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        self.name = args["model_name"]
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException(
                f"{self.name}: this model streams; it must be decoupled "
                "(model_transaction_policy { decoupled: true })"
            )
        params = {
            k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()
        }
        self.scorer = params.get("scorer", "lexical")
        if self.scorer not in ("lexical", "semantic"):
            raise pb_utils.TritonModelException(f"{self.name}: unknown scorer {self.scorer!r}")
        self.max_sentences = int(params.get("max_sentences", "3"))
        self.default_max_tokens = int(params.get("default_max_tokens", "256"))
        self.token_delay_s = float(params.get("token_delay_ms", "0")) / 1000.0
        self.min_similarity = float(params.get("min_similarity", "0.25"))
        self.embedder_model = params.get("embedder_model", "embedder")
        workers = int(params.get("max_concurrent_streams", "8"))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self.name)
        self._closing = threading.Event()
        _log(
            "info",
            f"{self.name}: scorer={self.scorer} max_sentences={self.max_sentences} "
            f"token_delay_ms={self.token_delay_s * 1000:g} workers={workers}",
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt, passages, max_tokens = self._parse(request)
            except ValueError as exc:
                self._fail(sender, str(exc))
                continue
            self._pool.submit(self._stream, request, sender, prompt, passages, max_tokens)
        return None

    def finalize(self) -> None:
        # Streams still running stop at their next token and send their final response.
        self._closing.set()
        self._pool.shutdown(wait=True)

    # -- request handling ---------------------------------------------------------------

    def _parse(self, request) -> tuple[str, list[str], int]:
        prompt_t = pb_utils.get_input_tensor_by_name(request, "PROMPT")
        if prompt_t is None:
            raise ValueError("PROMPT is required")
        prompt = " ".join(_decode(v) for v in prompt_t.as_numpy().reshape(-1)).strip()
        if not prompt:
            raise ValueError("PROMPT must not be empty")
        context_t = pb_utils.get_input_tensor_by_name(request, "CONTEXT")
        passages: list[str] = []
        if context_t is not None:
            passages = [_decode(v) for v in context_t.as_numpy().reshape(-1)]
        max_tokens = self.default_max_tokens
        max_t = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
        if max_t is not None and max_t.as_numpy().size:
            max_tokens = int(max_t.as_numpy().reshape(-1)[0])
            if max_tokens < 1:
                raise ValueError(f"MAX_TOKENS must be at least 1, got {max_tokens}")
        return prompt, passages, max_tokens

    def _stream(self, request, sender, prompt: str, passages: list[str], max_tokens: int) -> None:
        sent = 0
        try:
            if self._cancelled(request, sender):
                raise _Cancelled
            tokens = self._answer(request, sender, prompt, passages)[:max_tokens]
            last = len(tokens) - 1
            for i, token in enumerate(tokens):
                if self._cancelled(request, sender):
                    raise _Cancelled
                final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == last else 0
                sender.send(_token_response(token), flags=final)
                sent += 1
                if self.token_delay_s and i != last:
                    time.sleep(self.token_delay_s)
            if last < 0:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except _Cancelled:
            reason = "model unloading" if self._closing.is_set() else "cancelled"
            _log("info", f"{self.name}: stream stopped after {sent} tokens: {reason}")
            _close(sender)
        except Exception as exc:  # noqa: BLE001 - any failure must still end the stream
            _log("error", f"{self.name}: {type(exc).__name__}: {exc}")
            self._fail(sender, f"{type(exc).__name__}: {exc}")

    def _cancelled(self, request, sender) -> bool:
        if self._closing.is_set():
            return True
        if hasattr(sender, "is_cancelled"):
            return bool(sender.is_cancelled())
        return bool(request.is_cancelled())

    def _answer(self, request, sender, prompt: str, passages: list[str]) -> list:
        sentences = extractive.sentences_of(passages)
        if not sentences:
            return extractive.fixed_answer(extractive.NO_CONTEXT_ANSWER)
        if self.scorer == "lexical":
            picked = extractive.rank_lexical(prompt, sentences, top_k=self.max_sentences)
        else:
            windows = extractive.context_windows(sentences)
            extra = [w for w in windows if w is not None]
            vectors = self._embed([prompt] + [s.text for s in sentences] + extra, request, sender)
            n = len(sentences)
            sentence_vecs = vectors[1 : 1 + n]
            window_vecs = sentence_vecs.copy()
            window_rows = [i for i, w in enumerate(windows) if w is not None]
            window_vecs[window_rows] = vectors[1 + n :]
            lexical = extractive.bm25_scores(
                extractive.terms(prompt), [extractive.terms(s.text) for s in sentences]
            )
            picked = extractive.rank_semantic(
                vectors[0],
                sentence_vecs,
                window_vecs=window_vecs,
                lexical=lexical,
                top_k=self.max_sentences,
                min_similarity=self.min_similarity,
            )
        if not picked:
            return extractive.fixed_answer(extractive.NO_MATCH_ANSWER)
        return extractive.plan_answer([sentences[i] for i in picked])

    def _embed(self, texts: list[str], request, sender) -> np.ndarray:
        """Embeddings from the embedder model (BLS), in chunks of its max batch size."""
        chunks = []
        for start in range(0, len(texts), _EMBED_BATCH):
            if self._cancelled(request, sender):
                raise _Cancelled
            batch = np.array(
                [[t.encode("utf-8")] for t in texts[start : start + _EMBED_BATCH]], dtype=np.object_
            )
            response = pb_utils.InferenceRequest(
                model_name=self.embedder_model,
                requested_output_names=["EMBEDDING"],
                inputs=[pb_utils.Tensor("TEXT", batch)],
            ).exec()
            if response.has_error():
                raise RuntimeError(f"{self.embedder_model}: {response.error().message()}")
            chunks.append(pb_utils.get_output_tensor_by_name(response, "EMBEDDING").as_numpy())
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def _fail(self, sender, message: str) -> None:
        try:
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {message}")),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        except Exception as exc:  # noqa: BLE001 - the client may already be gone
            _log("warn", f"{self.name}: could not send error response: {exc}")


def _decode(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _token_response(token: extractive.Token):
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("TEXT", np.array([token.text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("PASSAGE", np.array([token.passage], dtype=np.int32)),
        ]
    )


def _close(sender) -> None:
    try:
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception as exc:  # noqa: BLE001 - the client may already be gone
        _log("verbose", f"could not close stream: {exc}")
