"""Every benchmark module imports: a helper renamed or moved breaks `make bench` only
when that benchmark runs, long after the change."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("module", sorted(p.stem for p in BENCH.glob("*.py")))
def test_a_benchmark_module_imports(module: str) -> None:
    assert importlib.import_module(f"bench.{module}").__name__ == f"bench.{module}"
