"""Fixtures for the task-evaluation tests; the helpers live in eval_helpers (a unique module name)."""

import pytest


@pytest.fixture(scope="session")
def tiny_pair():
    """(model, tokenizer): a tiny random Llama over a byte-level BPE trained on a sample text."""
    from eval_helpers import SAMPLE_TEXT, byte_bpe, tiny_llama

    tokenizer = byte_bpe([SAMPLE_TEXT])
    return tiny_llama(len(tokenizer)), tokenizer
