"""Fixtures for the foundation tests; the helpers live in foundation_helpers (a unique module name)."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with its tokenizer (treat as read-only; copy it to modify)."""
    from foundation_helpers import tiny_llama, tiny_tokenizer

    from secateurs.models import save_model

    target = tmp_path_factory.mktemp("tiny") / "llama"
    save_model(tiny_llama(), tiny_tokenizer(), target)
    return target
