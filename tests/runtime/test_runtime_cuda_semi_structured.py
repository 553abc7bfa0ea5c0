"""2:4 on CUDA through PyTorch's semi-structured sparse tensors (skipped without an NVIDIA GPU)."""

import pytest
import torch
import torch.nn.functional as F

from secateurs.runtime import modules
from secateurs.runtime.modules import NMLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with sparse tensor cores")


def two_four(rows, cols, seed=0):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    groups = weight.reshape(rows, -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(rows, cols)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37, 256])
def test_semi_structured_matches_dense(dtype, tokens, monkeypatch):
    # Force the sparse path at small sizes and for bf16 (the defaults route those to dense, being faster).
    monkeypatch.setattr(modules, "SEMI_STRUCTURED_MIN_TOKENS", 1)
    monkeypatch.setattr(modules, "SEMI_STRUCTURED_DTYPES", (torch.float16, torch.bfloat16))
    weight, bias = two_four(256, 512), torch.randn(256)
    module = NMLinear.from_dense(weight, bias, n=2, m=4).cuda()
    x = torch.randn(tokens, 512, device="cuda", dtype=dtype)
    expected = F.linear(x.float(), weight.cuda(), bias.cuda())
    y = module(x)
    assert "_semi_structured" in module.__dict__  # the sparse tensor-core path ran, not the dense fallback
    assert y.dtype == dtype and y.shape == (tokens, 256)
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-1)
