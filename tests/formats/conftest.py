"""Fixtures for the formats tests; the helpers live in formats_helpers (a unique module name)."""

import os
import sys
from pathlib import Path

import pytest

# The CLI test reuses the foundation tests' tiny tokenizer (foundation_helpers).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "foundation"))


@pytest.fixture(scope="session")
def interop_venvs() -> Path:
    return Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs"))
