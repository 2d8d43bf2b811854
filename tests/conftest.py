"""Shared test helpers."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "gen") not in sys.path:
    sys.path.insert(0, str(ROOT / "gen"))
