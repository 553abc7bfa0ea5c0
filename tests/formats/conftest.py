"""Fixtures for the formats tests; the helpers live in formats_helpers (a unique module name)."""

import os
import sys
from pathlib import Path

import pytest

# The CLI test reuses the foundation tests' tiny tokenizer (foundation_helpers).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "foundation"))


def pytest_configure(config):
    config.addinivalue_line("markers", "interop: decompresses our files with compressed-tensors in its own virtualenv "
                                       "(scripts/interop_venvs.sh); skipped when the venv is missing")


@pytest.fixture(scope="session")
def interop_venvs() -> Path:
    return Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs"))
