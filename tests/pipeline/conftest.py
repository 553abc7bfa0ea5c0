"""Fixtures for the pipeline tests; the helpers live in pipeline_helpers (a unique module name)."""

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 4-block tiny Llama in float32 safetensors shards with its tokenizer (read-only)."""
    from pipeline_helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    from pipeline_helpers import word_text

    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(word_text(400))
    return path
