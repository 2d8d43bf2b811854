"""Everything needed to start the `tritonserver` binary bundled in `nvidia-pytriton`.

Plain functions, no process management: the launcher calls them to lay out a run
directory and to build the command line and environment, then starts the process itself.

Three things the bundled binary needs that are easy to get wrong:

- The Python backend runs models in a separate "stub" process, and the stub must match the
  running Python version. pytriton ships one stub per version and copies the right one
  into a private copy of the backend before it starts the server; `prepare_backend_dir`
  does the same under the run directory (site-packages is never modified).
- The stub links against `libpython3.11.so.1.0`. Without help it finds the system one,
  which is another 3.11 build than the interpreter whose packages the models import, and
  loading fails with `'_thread.RLock' object has no attribute '_recursion_count'`.
  `tritonserver_command` puts the running interpreter's `sysconfig` LIBDIR first on
  LD_LIBRARY_PATH. The copied stub and backend library also lose their `$ORIGIN`-relative
  RPATH to `nvidia_pytriton.libs`, so that directory goes on LD_LIBRARY_PATH too.
- The stub's interpreter does not know about this virtualenv: PYTHONPATH carries the
  running interpreter's site-packages, so models import numpy, torch and
  sentence-transformers from it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.launcher._config import LauncherConfig

logger = logging.getLogger(__name__)

#: Where the model repository lives in the source tree.
MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "triton-models"

_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"
_REPO_MARKER = ".switchboard-model-repository"
_BLS_SUFFIX = "_model"
"""A model parameter whose key ends in this names another model it calls through BLS,
e.g. generator_large's `embedder_model: "embedder"`; that model is loaded along with it."""


class TritonSetupError(RuntimeError):
    """The bundled Triton cannot be prepared (missing package, stub or model)."""


def tritonserver_dist() -> Path:
    """The `tritonserver/` directory inside the installed `nvidia-pytriton` package."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonSetupError(
            "nvidia-pytriton is not installed: it carries the tritonserver binary"
        )
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise TritonSetupError(f"no tritonserver binary under {dist}")
    return dist


def tritonserver_binary() -> Path:
    """Path of the bundled `tritonserver` executable."""
    return tritonserver_dist() / "bin" / "tritonserver"


def triton_libs_dir() -> Path:
    """`nvidia_pytriton.libs`: the shared libraries the binary, backend and stub link to."""
    return tritonserver_dist().parents[1] / "nvidia_pytriton.libs"


def python_libdir() -> Path:
    """The running interpreter's LIBDIR, where its own libpython lives."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        raise TritonSetupError("sysconfig has no LIBDIR for this interpreter")
    return Path(libdir)


def prepare_backend_dir(run_dir: Path) -> Path:
    """Lay out a private Python backend for the running Python version under `run_dir`.

    Copies `libtriton_python.so`, `triton_python_backend_utils.py` and the stub built for
    this interpreter's major.minor into `<run_dir>/triton-backends/python/`, replacing what
    a previous run left there. Returns `<run_dir>/triton-backends`, the value for
    `--backend-directory`.
    """
    dist = tritonserver_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / _STUB
    if not stub.is_file():
        available = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise TritonSetupError(
            f"nvidia-pytriton has no Python backend stub for Python {version} "
            f"(it has {', '.join(available)})"
        )
    backends = Path(run_dir) / "triton-backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in _BACKEND_FILES:
        shutil.copy2(dist / "backends" / "python" / name, python_dir / name)
    shutil.copy2(stub, python_dir / _STUB)
    (python_dir / _STUB).chmod(0o755)
    logger.debug("python backend for %s prepared in %s", version, python_dir)
    return backends


def gpu_available() -> bool:
    """True when `nvidia-smi` exists and lists at least one GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.info("nvidia-smi failed: %s", exc)
        return False
    return out.returncode == 0 and any(line.startswith("GPU ") for line in out.stdout.splitlines())


def available_models(repo: Path) -> list[str]:
    """Names of the models in a repository (directories with a config.pbtxt), sorted."""
    return sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt"))


def read_model_config(path: Path) -> model_config_pb2.ModelConfig:
    """A `config.pbtxt`, parsed into Triton's own `ModelConfig` message.

    Raises:
        TritonSetupError: the file is not a valid model configuration.
    """
    try:
        return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonSetupError(f"{path}: not a Triton model configuration: {exc}") from exc


def model_dependencies(repo: Path, model: str) -> list[str]:
    """Models that `model` calls through BLS, as named by its `*_model` parameters."""
    config = read_model_config(Path(repo) / model / "config.pbtxt")
    return list(
        dict.fromkeys(
            config.parameters[key].string_value
            for key in sorted(config.parameters)
            if key.endswith(_BLS_SUFFIX)
        )
    )


def resolve_models(repo: Path, models: Sequence[str] | None) -> list[str]:
    """The models to load: `models` (all when None) plus what they call through BLS,
    dependencies first. Unknown names raise TritonSetupError."""
    known = available_models(repo)
    wanted = list(known if models is None else models)
    ordered: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name not in known:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise TritonSetupError(
                f"no model {name!r}{via} in {repo}; models: {', '.join(known) or 'none'}"
            )
        if name in ordered or name in chain:
            return
        for dep in model_dependencies(repo, name):
            visit(dep, (*chain, name))
        ordered.append(name)

    for name in wanted:
        visit(name, ())
    return ordered


def prepare_model_repository(
    src: Path, dst: Path, *, gpu: bool, models: Sequence[str] | None = None
) -> Path:
    """Copy the model repository `src` (or only `models` and their BLS dependencies) to
    `dst` for one server run, and return `dst`.

    Symlinks inside models (shared code) are copied as the files they point to, so any
    subset of models stands on its own. With `gpu`, instance groups become `KIND_GPU`.
    A `dst` left by a previous run is replaced; any other non-empty `dst` is refused.
    """
    src, dst = Path(src), Path(dst)
    names = resolve_models(src, models)
    if dst.exists():
        if not (dst / _REPO_MARKER).is_file() and any(dst.iterdir()):
            raise TritonSetupError(f"{dst} exists and is not a prepared model repository")
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in names:
        shutil.copytree(src / name, dst / name, symlinks=False, ignore=ignore)
        if gpu:
            _use_gpus(dst / name / "config.pbtxt")
    (dst / _REPO_MARKER).write_text(f"prepared from {src}\n")
    logger.debug("model repository %s prepared in %s (gpu=%s)", names, dst, gpu)
    return dst


def tritonserver_command(
    *,
    model_repo: Path,
    backend_dir: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    models: Sequence[str] | None,
    host: str = "127.0.0.1",
    shm_prefix: str | None = None,
    gpu: bool | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and the extra environment to start tritonserver.

    `models` (plus their BLS dependencies) are loaded with explicit model control; None
    loads every model of `model_repo`. All endpoints bind to `host`. `shm_prefix` names
    the Python backend's shared-memory regions and must differ between servers running
    at once; by default it is `shm_prefix_for(grpc_port)`. With
    `gpu=False` the CUDA memory pools and GPU metrics are switched off (no NVML/DCGM errors
    in the log on a machine without a GPU); None leaves Triton's defaults.

    The environment is to be laid over os.environ: LD_LIBRARY_PATH (the interpreter's
    LIBDIR first, then nvidia_pytriton.libs, then any existing value), PYTHONPATH (this
    interpreter's site-packages, then any existing value), PATH (this interpreter's bin
    first) and offline switches for Hugging Face libraries.
    """
    names = resolve_models(Path(model_repo), models)
    prefix = shm_prefix or shm_prefix_for(grpc_port)
    argv = [
        str(tritonserver_binary()),
        f"--model-repository={Path(model_repo).resolve()}",
        f"--backend-directory={Path(backend_dir).resolve()}",
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in names),
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--disable-auto-complete-config",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=true",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        "--allow-sagemaker=false",
        "--allow-vertex-ai=false",
        f"--backend-config=python,shm-region-prefix-name={prefix}",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ]
    if gpu is False:
        argv += [
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
        ]
    env = {
        "LD_LIBRARY_PATH": _join_paths(
            python_libdir(), triton_libs_dir(), os.environ.get("LD_LIBRARY_PATH")
        ),
        "PYTHONPATH": _join_paths(*_site_packages(), os.environ.get("PYTHONPATH")),
        "PATH": _join_paths(Path(sys.executable).parent, os.environ.get("PATH")),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return argv, env


def shm_prefix_for(grpc_port: int) -> str:
    """The default name prefix of a server's Python-backend shared-memory regions.

    One server per gRPC port can run at a time, and the backend adds a UUID to each
    region, so the port alone keeps servers apart and lets `remove_shm_regions` find
    what a killed server left behind.
    """
    return f"switchboard_triton_{grpc_port}_"


def remove_shm_regions(grpc_port: int, *, shm_dir: Path = Path("/dev/shm")) -> list[Path]:
    """Delete the shared-memory regions of the server that used `grpc_port`; returns them.

    A server stopped with SIGTERM removes its own; one that was killed (SIGKILL, OOM)
    leaves 1 MiB+ files in /dev/shm per model instance. Call this only once that server
    has exited.
    """
    removed = []
    for path in Path(shm_dir).glob(f"{shm_prefix_for(grpc_port)}*"):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        logger.info("removed %d stale Triton shared-memory regions", len(removed))
    return removed


def _site_packages() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(p) for p in dict.fromkeys((paths["purelib"], paths["platlib"]))]


def _join_paths(*parts: Path | str | None) -> str:
    seen: list[str] = []
    for part in parts:
        for item in str(part).split(os.pathsep) if part else ():
            if item and item not in seen:
                seen.append(item)
    return os.pathsep.join(seen)


def _use_gpus(path: Path) -> None:
    """Rewrites a prepared model's configuration so its CPU instances run on GPUs."""
    config = read_model_config(path)
    for group in config.instance_group:
        if group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_GPU
    path.write_text(text_format.MessageToString(config))


MODELS = tuple(available_models(MODEL_REPOSITORY))
"""Every model of the repository in `triton-models/` (its directories are the names)."""


def run_files(config: LauncherConfig) -> tuple[Path, Path, bool]:
    """The run directory's Triton model repository and Python backend (laid out on first
    use), and whether the replicas run on a GPU."""
    gpu = {"on": True, "off": False}.get(config.gpu)
    if gpu is None:
        gpu = gpu_available()
    repo = config.run_dir / "triton-models"
    backend_dir = config.run_dir / "triton-backends"
    if not repo.exists():
        repo = prepare_model_repository(MODEL_REPOSITORY, repo, gpu=gpu, models=MODELS)
    if not backend_dir.exists():
        backend_dir = prepare_backend_dir(config.run_dir)
    return repo, backend_dir, gpu
