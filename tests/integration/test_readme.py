"""The README is tested: every command it shows runs against the real mesh.

The fenced code blocks are read from README.md itself (CommonMark's fence rules), so a
block added later is run without anyone listing it here:

- ```sh (or bash, shell) blocks run with bash, `set -euo pipefail`, in the repository
  root; ```python blocks run with the venv's Python (from the same bash).
- Blocks run in README order as one session: each block is its own bash process that
  starts with the variables every earlier block set (KEY, A, G, SESSION...; carried in a
  file with `declare -p`, exports included), as a reader pasting the README top to bottom
  has them. A block is not run after an earlier one failed. Only variables travel: a
  `cd` or a function does not.
- The README's commands reach the session's mesh (the `mesh` fixture, on ports of its
  own) through the variables they already honour: every `SWITCHBOARD_*` setting of the
  launcher is exported from the mesh's config (run directory, Envoy and PostgreSQL
  ports...), so `switchboard keys`, `switchboard logs` and `make status` act on it.
  grpcurl and the Python client name `localhost:8080` literally; that address is
  rewritten to the mesh's Envoy port, the only change made to a command.
- `make` runs with `-o .venv/.installed` (a shell function): the venv is installed, and a
  test must not reinstall it when pyproject.toml is newer than the stamp.
- A command that must not run here is listed in EXCLUDED with its reason and left out
  of its block (the rest of the block runs); an entry no longer in the README fails.
- Each block must exit 0, and its output must contain what SHOWS expects of it (keyed by
  a fragment of the block's text; a stale key fails too).
- Any other fenced block (no language, text, json) is not a command, and must not look
  like a shell transcript (`$ ...`): a command belongs in a ```sh block, where it runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from services.launcher import LauncherConfig, Mesh

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SHELL_LANGUAGES = {"sh", "bash", "shell"}
PYTHON_LANGUAGES = {"python", "py"}
BLOCK_TIMEOUT_S = 90.0
STAMP = ".venv/.installed"
"""The Makefile's install stamp: `make` here takes the venv as installed."""

EXCLUDED = {
    "make demo": "its `Mesh.up` would act on the session's run directory: it reuses a whole"
    " mesh but stops one it finds partly dead, and every integration test shares this one;"
    " what the demo prints is unit-tested (tests/unit/test_chat_transcript.py)",
    "make test": "the whole suite (this test included), lint and the drift check: recursive"
    " and many minutes",
    "make up": "the session's mesh is up already, started by the same `Mesh.up` (see make"
    " demo for what `up` does to a partly dead mesh)",
    "make down": "would stop the session's mesh, which the tests after this one use",
    ".venv/bin/switchboard up --prometheus": "as make up (its Mesh.up acts on the session's"
    " mesh); tests/integration/test_prometheus.py starts Prometheus on the session's mesh"
    " with the launcher code it runs (Mesh.start_prometheus)",
}
"""Commands of the README not run here (a whole line of a block, comment aside)."""

SHOWS = {
    "switchboard trace --slowest 5": ("start ms", "dur ms", "timeline"),
    "keys revoke": ("eyJ", "my laptop", "active"),
    "make web": ("<title>Switchboard chat</title>",),
    "make status": ("envoy", "running", "inference.log <=="),
    "switchboard rollout gateway": (
        "triton-0      SERVING",
        "config version",
        "generation 2",
        "gateway-1     SERVING",
    ),
    "grpc.health.v1.Health/Check": (
        "switchboard.inference.v1.InferenceService",
        "rpc Generate",
        "is a message",
        '"status": "SERVING"',
    ),
    "InferenceService/Generate\n": (
        '"complete"',
        '"text": "Triton batches concurrent requests dynamically."',
        '"dimensions": 384',
        '"models": [',
    ),
    "RagService/IngestDocuments": (
        '"documents_ingested": 2',
        '"text": "Parental leave is sixteen weeks at full pay for every parent."',
        '"name": "handbook"',
    ),
    "ExecutionService/WatchTask": (
        "STEP_EVENT_TYPE_COMPLETED",
        "TASK_EVENT_TYPE_COMPLETED",
        '"result": "42"',
        "depends on itself",
    ),
    "ChatService/Converse": (
        '"text": "sixteen "',
        '"document_id": "leave"',
        "MESSAGE_STATUS_COMPLETED",
    ),
    "-format-error": (
        '"code": 3',
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
        "grpcurl exited with 67",
    ),
    "stub.Generate(": ("completion_tokens", "generator_"),
    "promtool test rules": ("rules found", "rules_test.yml\n  SUCCESS"),
    "chat.completions.create(": ("Envoy is a proxy.", "completion_tokens="),
    "keys create --operator": (
        '"weight": 2',
        '"max_in_flight": 64',
        '"tenant_id": "acme"',
        "may be called by operator credentials",
        '"tenant_id": "globex"',
        '"token": "eyJ',
        "refused, grpcurl exited with 71",
    ),
}
"""What a block's output must contain, by a fragment of the block's text."""

PUBLIC_ADDRESS = re.compile(rf"\b(localhost|127\.0\.0\.1):{LauncherConfig().envoy_port}\b")
"""Envoy's public listener as the README names it (the default port)."""
EXTERNAL_URLS = ("DATABASE_URL", "NATS_URL", "TRITON_URL")
"""Read by the launcher besides its `SWITCHBOARD_*` variables."""

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Block:
    line: int
    """The line of its opening fence, from 1."""
    language: str
    text: str
    section: str

    @property
    def runs(self) -> bool:
        return self.language in SHELL_LANGUAGES | PYTHON_LANGUAGES

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"L{self.line}-{slug or 'top'}"


def fenced_blocks(markdown: str) -> Iterator[Block]:
    """The fenced code blocks of a CommonMark document, in order.

    A fence is three or more backticks or tildes indented at most three spaces; a
    backtick fence's info string holds no backtick (so a line opening with
    ```` ```python ```` inline code is text); the block ends at a fence of the same
    character at least as long, or at the end of the document; its lines lose the
    opening fence's indentation. (Fences nested in list items or quotes are not looked
    for: the README has none.)
    """
    lines = markdown.splitlines()
    section = ""
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None or (fence[2][0] == "`" and "`" in fence[3]):
            if heading := _HEADING.match(lines[i]):
                section = heading[1]
            i += 1
            continue
        indent, marker, info = len(fence[1]), fence[2], fence[3].strip()
        closing = re.compile(rf"^ {{0,3}}{re.escape(marker[0])}{{{len(marker)},}}\s*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            j += 1
        language = info.split()[0].lower() if info else ""
        yield Block(i + 1, language, "\n".join(body) + "\n", section)
        i = j + 1


def _command(line: str) -> str:
    return line.split("#", 1)[0].strip()


def commands(text: str) -> list[str]:
    """The lines of a shell block that do something (comments and blank lines aside)."""
    return [c for c in map(_command, text.splitlines()) if c]


def without_exclusions(text: str) -> str:
    return "\n".join(
        f"# not run by test_readme: {line.strip()}" if _command(line) in EXCLUDED else line
        for line in text.splitlines()
    )


BLOCKS = list(fenced_blocks(README.read_text()))
RUNNABLE = [b for b in BLOCKS if b.runs]


# -- the README, read -------------------------------------------------------------------------


def test_the_parser_finds_the_readme_blocks():
    assert len(RUNNABLE) >= 10, [b.name for b in BLOCKS]
    assert {b.language for b in RUNNABLE} == {"sh", "python"}
    # the line that opens with inline code is prose, not a fence
    assert not any(b.text.startswith("block — runs") for b in BLOCKS)


def test_every_exclusion_is_still_in_the_readme():
    shown = {c for b in RUNNABLE for c in commands(b.text)}
    stale = sorted(set(EXCLUDED) - shown)
    assert not stale, f"no longer in README.md, remove from EXCLUDED: {stale}"


def test_every_expectation_names_a_readme_block():
    stale = sorted(k for k in SHOWS if not any(k in b.text for b in RUNNABLE))
    assert not stale, f"no README block contains these SHOWS keys any more: {stale}"


def test_the_blocks_name_envoy_only_at_its_default_address():
    """What the rewrite to the session mesh's port catches: no other spelling of it."""
    port = LauncherConfig().envoy_port
    for block in RUNNABLE:
        others = re.findall(rf"\S*:{port}\b", PUBLIC_ADDRESS.sub("", block.text))
        assert not others, f"README.md:{block.line}: use localhost:{port}, not {others}"


def test_no_command_hides_outside_a_runnable_block():
    for block in BLOCKS:
        if block.runs:
            continue
        prompts = [line for line in block.text.splitlines() if line.lstrip().startswith("$ ")]
        assert not prompts, (
            f"README.md:{block.line}: a shell transcript in a ```{block.language} block:"
            f" write the command in a ```sh block (output as comments), where it runs: {prompts}"
        )


# -- the README, run --------------------------------------------------------------------------


def launcher_environment(config: LauncherConfig) -> dict[str, str]:
    """The environment under which `load_launcher_config` gives back `config`."""
    env = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, timedelta):
            value = f"{value.total_seconds()}s"
        if value != "":
            env[f"SWITCHBOARD_{field.name.upper()}"] = str(value)
    return env


@dataclass
class Outcome:
    returncode: int | None
    output: str
    seconds: float
    script: str


_CARRY = r"""
for __readme_v in $(compgen -v); do
  case "$__readme_known" in *" $__readme_v "*) continue ;; esac
  case "$__readme_v" in __readme_* | BASH* | PIPESTATUS | FUNCNAME | _) continue ;; esac
  declare -p "$__readme_v"
done > {state_next}
"""


class ReadmeSession:
    """Runs the README's blocks in order, once each, carrying their variables."""

    def __init__(self, mesh: Mesh, state_dir: Path) -> None:
        self._port = str(mesh.config.envoy_port)
        self._state = state_dir / "variables.sh"
        self._state.write_text("")
        # nothing of the caller's own mesh settings: only the session mesh's
        self._env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SWITCHBOARD_") and k not in EXTERNAL_URLS
        }
        self._env.update(launcher_environment(mesh.config))
        self._outcomes: dict[int, Outcome] = {}
        self._failed: Block | None = None

    def outcome(self, block: Block) -> Outcome:
        """The block's run, running every block before it first."""
        for earlier in RUNNABLE[: RUNNABLE.index(block) + 1]:
            if earlier.line in self._outcomes:
                continue
            if self._failed is not None:
                pytest.fail(f"not run: the earlier block {self._failed.name} failed")
            outcome = self._outcomes[earlier.line] = self._run(earlier)
            if outcome.returncode != 0:
                self._failed = earlier
        return self._outcomes[block.line]

    def _script(self, block: Block) -> str:
        text = PUBLIC_ADDRESS.sub(rf"\g<1>:{self._port}", block.text)
        if block.language in PYTHON_LANGUAGES:
            text = f".venv/bin/python - <<'__README_PYTHON__'\n{text}__README_PYTHON__\n"
        else:
            text = without_exclusions(text) + "\n"
        state_next = self._state.with_suffix(".next")
        return (
            "set -euo pipefail\n"
            f'make() {{ command make -o {STAMP} "$@"; }}\n'
            '__readme_known=" $(compgen -v | tr "\\n" " ") "\n'
            f"source {shlex.quote(str(self._state))}\n"
            f"# ---- README.md:{block.line} ----\n"
            f"{text}"
            "# ---- end ----\n" + _CARRY.format(state_next=shlex.quote(str(state_next)))
        )

    def _run(self, block: Block) -> Outcome:
        script = self._script(block)
        started = time.monotonic()
        process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=REPO,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a timeout stops the block's commands too
        )
        try:
            output, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            output += f"\n[killed after {BLOCK_TIMEOUT_S:.0f} s]"
        seconds = time.monotonic() - started
        if process.returncode == 0:
            self._state.with_suffix(".next").replace(self._state)
        return Outcome(process.returncode, output, seconds, script)


@pytest.fixture(scope="module")
def readme(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> ReadmeSession:
    return ReadmeSession(mesh, tmp_path_factory.mktemp("readme"))


@pytest.mark.timeout(BLOCK_TIMEOUT_S * 2 + 60)
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.name)
def test_readme_block(block: Block, readme: ReadmeSession):
    if block.language in SHELL_LANGUAGES and not commands(without_exclusions(block.text)):
        pytest.skip(f"every command is excluded: {commands(block.text)} (see EXCLUDED)")
    outcome = readme.outcome(block)
    where = f"README.md:{block.line} ({block.section}), {outcome.seconds:.1f}s"
    print(f"--- {where} ---\n{outcome.output}")  # shown by pytest -rP
    assert outcome.returncode == 0, (
        f"{where}: exit status {outcome.returncode}\n--- output ---\n{outcome.output[-6000:]}"
        f"\n--- script ---\n{outcome.script}"
    )
    expected = [s for key, shows in SHOWS.items() if key in block.text for s in shows]
    missing = [s for s in expected if s not in outcome.output]
    assert not missing, f"{where}: output lacks {missing}\n--- output ---\n{outcome.output[-6000:]}"
