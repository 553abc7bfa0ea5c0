"""The attention kernel (causal for the calibration passes, bidirectional with a key padding mask for
encoders) against a float64 softmax computed whole."""

import math

import pytest
import torch

from secateurs.runtime import kernels


def reference(q, k, v, scale, causal=True, key_mask=None):
    """softmax(scale q kᵀ) v in float64, one (batch, head, query) at a time, over the keys it may see
    (none: 0); [batch, seq, heads, dim]."""
    q, k, v = (t.double() for t in (q, k, v))
    batch, heads, seq, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, seq, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(seq):
                seen = [j for j in range(t + 1 if causal else seq) if key_mask is None or key_mask[b, j]]
                if seen:
                    weights = (scale * k[b, h // group, seen] @ q[b, h, t]).softmax(0)
                    out[b, t, h] = weights @ v[b, h // group, seen]
    return out


def inputs(batch, heads, kv_heads, seq, dim, seed=0, spread=1.0):
    """As attention modules hand them over: [batch, heads, seq, dim] views of [batch, seq, heads * dim]."""
    g = torch.Generator().manual_seed(seed)
    make = lambda h: (spread * torch.randn(batch, seq, h * dim, generator=g)).view(batch, seq, h, dim).transpose(1, 2)
    return make(heads), make(kv_heads), make(kv_heads)


@pytest.mark.parametrize("batch,heads,kv_heads,seq,dim", [
    (2, 4, 2, 37, 16), (1, 3, 3, 1, 32), (2, 6, 2, 100, 64), (1, 9, 3, 64, 64), (3, 2, 1, 33, 48), (1, 4, 4, 70, 128),
])
def test_matches_the_float64_softmax(kernel_path, batch, heads, kv_heads, seq, dim):
    q, k, v = inputs(batch, heads, kv_heads, seq, dim, seed=seq)
    out = kernels.attention(q, k, v, dim ** -0.5)
    assert out.shape == (batch, seq, heads, dim) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), reference(q, k, v, dim ** -0.5), rtol=1e-5, atol=1e-5)
    assert kernels.last_kernel_path() == kernel_path


@pytest.mark.parametrize("batch,heads,kv_heads,seq,dim", [(2, 4, 2, 37, 16), (3, 6, 6, 64, 32), (1, 2, 1, 1, 48)])
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_and_bidirectional(kernel_path, batch, heads, kv_heads, seq, dim, causal):
    """Encoders: every query sees every key its batch entry keeps (right or left padding, holes); a
    query with no key left (an all-padding entry, or causal before the first kept key) gives 0."""
    q, k, v = inputs(batch, heads, kv_heads, seq, dim, seed=seq + 1)
    g = torch.Generator().manual_seed(seq)
    key_mask = torch.rand(batch, seq, generator=g) > 0.3
    key_mask[0, seq // 2:] = False  # right padding
    if batch > 2:
        key_mask[2] = False  # nothing to attend to
    out = kernels.attention(q, k, v, dim ** -0.5, causal=causal, key_mask=key_mask)
    torch.testing.assert_close(out.double(), reference(q, k, v, dim ** -0.5, causal, key_mask), rtol=1e-5, atol=1e-5)
    no_mask = kernels.attention(q, k, v, dim ** -0.5, causal=causal, key_mask=torch.ones(batch, seq, dtype=torch.bool))
    assert torch.equal(no_mask, kernels.attention(q, k, v, dim ** -0.5, causal=causal))
    torch.testing.assert_close(no_mask.double(), reference(q, k, v, dim ** -0.5, causal), rtol=1e-5, atol=1e-5)


def test_large_scores_and_contiguous_inputs(kernel_path):
    """Scores in the hundreds (the row maximum is subtracted before exp, underflow gives zeros):
    float32 itself is then the limit, so the error is held to PyTorch's own float32 SDPA's."""
    q, k, v = (t.contiguous() for t in inputs(2, 4, 2, 80, 32, seed=3, spread=6.0))
    exact = reference(q, k, v, 1.0)
    torch_fp32 = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=True)
    ours = (kernels.attention(q, k, v, 1.0).double() - exact).abs().max()
    assert ours <= 2 * (torch_fp32.transpose(1, 2).double() - exact).abs().max() + 1e-6


def test_two_threads_agree_with_one(kernel_path, two_threads):
    q, k, v = inputs(2, 6, 3, 257, 64, seed=5)
    many = kernels.attention(q, k, v, 0.125)
    torch.set_num_threads(1)
    assert torch.equal(many, kernels.attention(q, k, v, 0.125))


def test_nan_stays_in_its_own_rows(kernel_path):
    q, k, v = inputs(1, 4, 2, 40, 16, seed=7)
    q = q.clone()
    q[0, 1, 20, 3] = math.nan  # head 1, position 20
    out = kernels.attention(q, k, v, 0.25)
    assert out[0, 20, 1].isnan().all()
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[0, 20, 1] = False
    assert out[finite].isfinite().all()


def test_head_dims_off_the_tile_fall_back_to_torch():
    q, k, v = inputs(1, 4, 2, 30, 24, seed=1)
    out = kernels.attention(q, k, v, 0.2)
    assert kernels.last_kernel_path() == "torch"
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), "do not fit"),
    (lambda q, k, v: (q[:, :3], k, v), "do not fit"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "float32"),
    (lambda q, k, v: (q, k, v[..., :8]), "4-d, key and value alike"),
    (lambda q, k, v: (q[0], k[0], v[0]), "4-d"),
])
def test_rejects_bad_arguments(change, message):
    q, k, v = change(*inputs(1, 4, 2, 10, 16))
    with pytest.raises(ValueError, match=message):
        kernels.attention(q, k, v, 0.25)


@pytest.mark.parametrize("key_mask", [torch.ones(1, 9, dtype=torch.bool), torch.ones(1, 10), torch.ones(2, 10, dtype=torch.bool)])
def test_rejects_a_key_mask_of_the_wrong_shape_or_type(key_mask):
    with pytest.raises(ValueError, match="key_mask"):
        kernels.attention(*inputs(1, 4, 2, 10, 16), 0.25, causal=False, key_mask=key_mask)
