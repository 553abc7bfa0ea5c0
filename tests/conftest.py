"""Shared by every test directory."""

import pytest
import torch

# Their problems are tiny, so thread start-up costs more than it saves on a shared 2-core machine,
# and bit-identical comparisons (resume, subprocesses) want one intra-op thread.
SINGLE_THREADED = {"algorithms", "diffusion", "pipeline", "training"}


@pytest.fixture(autouse=True)
def single_thread(request):
    if request.path.parent.name not in SINGLE_THREADED:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
