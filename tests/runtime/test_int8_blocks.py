"""int8 activations times int8 weights in blocks of 4 columns (kernels.int8_blocks_mm): the
layout round-trips, every path (the AVX-512 VNNI kernel, torch elsewhere) gives the same float32
result bit for bit, that result is within the per-token quantization bound of the exact product,
and the module and the encoder use it only where asked."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import forced_path
from secateurs.runtime import SparseQuantLinear, kernels, layouts
from secateurs.runtime.encoder import accelerate_encoder


def sparse_codes(rows: int, cols: int, density: float, generator: torch.Generator) -> torch.Tensor:
    codes = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=generator)
    codes[torch.rand(rows, cols, generator=generator) >= density] = 0
    return codes


def case(rows, cols, batch, density, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codes = sparse_codes(rows, cols, density, generator)
    x = torch.randn(batch, cols, generator=generator) * 3
    row_scale = torch.rand(rows, generator=generator) / 100
    bias = torch.randn(rows, generator=generator)
    return codes, x, row_scale, bias


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 9), cols=st.integers(1, 23), density=st.sampled_from([0.0, 0.2, 0.7, 1.0]),
       seed=st.integers(0, 2**16))
def test_layout_round_trips_and_counts_nonzero_groups(rows, cols, density, seed):
    codes = sparse_codes(rows, cols, density, torch.Generator().manual_seed(seed))
    groups, packed, offsets, sums = layouts.int8_blocks(codes)
    assert torch.equal(layouts.int8_blocks_to_dense(groups, packed, offsets, cols), codes)
    padded = torch.nn.functional.pad(codes, (0, -cols % 4)).view(rows, (cols + 3) // 4, 4)
    assert offsets.tolist() == [0] + (padded != 0).any(dim=2).sum(dim=1).cumsum(0).tolist()
    assert sums.tolist() == codes.to(torch.int64).sum(dim=1).tolist()
    assert groups.dtype == packed.dtype == sums.dtype == torch.int32


@pytest.mark.parametrize("batch", (1, 64, 130, 257))
def test_every_path_gives_the_same_result_within_the_quantization_bound(kernel_path, batch, two_threads):
    codes, x, row_scale, bias = case(37, 390, batch, 0.3)
    x[0] = 0.0  # a zero token: its outputs are the bias
    blocks = layouts.int8_blocks(codes)
    y = kernels.int8_blocks_mm(x, *blocks, row_scale, 390, bias=bias)
    assert torch.equal(y, kernels.int8_blocks_reference(x, codes, row_scale, bias, None))
    assert torch.equal(y[0], bias)
    # |x - q s| <= s / 2 per element (s = max |x| / 127 of its token), so the product is off by at
    # most s / 2 * sum |w| of its row, plus float32 rounding
    weight = codes.double() * row_scale.double()[:, None]
    exact = x.double() @ weight.T + bias.double()
    bound = (x.abs().amax(dim=1, keepdim=True).double() / 127 / 2) @ weight.abs().sum(dim=1, keepdim=True).T
    assert ((y.double() - exact).abs() <= bound * (1 + 1e-5) + 1e-5 * exact.abs() + 1e-6).all()


def test_threads_split_tokens_with_the_same_result():
    codes, x, row_scale, bias = case(52, 300, 1000, 0.2, seed=3)
    blocks = layouts.int8_blocks(codes)
    torch.set_num_threads(2)
    split = kernels.int8_blocks_mm(x, *blocks, row_scale, 300, bias=bias, activation="gelu")
    torch.set_num_threads(1)
    assert torch.equal(split, kernels.int8_blocks_mm(x, *blocks, row_scale, 300, bias=bias, activation="gelu"))


@pytest.mark.parametrize("activation", ("gelu", "silu", "gelu_pytorch_tanh"))
def test_fused_activation_matches_torch(kernel_path, activation):
    codes, x, row_scale, bias = case(20, 64, 100, 0.5, seed=5)
    y = kernels.int8_blocks_mm(x, *layouts.int8_blocks(codes), row_scale, 64, bias=bias, activation=activation)
    reference = kernels.int8_blocks_reference(x, codes, row_scale, bias, activation)
    torch.testing.assert_close(y, reference, rtol=1e-6, atol=2e-6)


def test_tokens_with_nan_or_inf_are_computed_in_float32(kernel_path):
    codes, x, row_scale, bias = case(16, 40, 70, 0.5, seed=7)
    finite = x.clone()
    x[3, 5], x[9, 0], x[12] = float("nan"), float("inf"), 1e-35  # the last one rounds to zero
    y = kernels.int8_blocks_mm(x, *layouts.int8_blocks(codes), row_scale, 40, bias=bias)
    clean = kernels.int8_blocks_mm(finite, *layouts.int8_blocks(codes), row_scale, 40, bias=bias)
    others = [t for t in range(70) if t not in (3, 9, 12)]
    assert torch.equal(y[others], clean[others])
    assert torch.equal(y[12], bias)
    fp32 = x[[3, 9]] @ (codes.float() * row_scale[:, None]).T + bias
    assert torch.equal(y[[3, 9]].isnan(), fp32.isnan()) and torch.equal(y[[3, 9]].nan_to_num(), fp32.nan_to_num())


def test_rejects_bad_arguments():
    codes, x, row_scale, _ = case(4, 8, 64, 0.5)
    blocks = layouts.int8_blocks(codes)
    with pytest.raises(ValueError, match="x must have shape"):
        kernels.int8_blocks_mm(x[:, :7], *blocks, row_scale, 8)
    with pytest.raises(ValueError, match="x must have dtype"):
        kernels.int8_blocks_mm(x.to(torch.bfloat16), *blocks, row_scale, 8)
    with pytest.raises(ValueError, match="row_scale must have shape"):
        kernels.int8_blocks_mm(x, *blocks, row_scale[:3], 8)
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.int8_blocks_mm(x, *blocks, row_scale, 8, activation="relu")


def quant_layer(seed=0, rows=48, cols=96):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight[torch.rand(rows, cols, generator=generator) < 0.8] = 0
    return SparseQuantLinear.from_dense(weight, torch.randn(rows, generator=generator))


def test_module_uses_int8_activations_only_when_asked_and_at_64_tokens():
    layer = quant_layer()
    codes = layouts.bitmask_to_dense(layer.bitmask, layer.values, layer.row_offsets, 96)
    x = torch.randn(2, 40, 96)
    with torch.no_grad():
        plain = layer(x)
        layer.int8_activations = True
        quantized = layer(x)
        assert torch.equal(quantized, kernels.int8_blocks_reference(x.reshape(80, 96), codes, layer.scale, layer.bias,
                                                                     None).reshape(2, 40, 48))
        assert not torch.equal(quantized, plain)
        assert torch.equal(layer(x[:, :30]), plain[:, :30])  # 60 tokens: below INT8_BLOCKS_MIN_TOKENS
        assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_module_rebuilds_its_blocks_when_its_weights_change():
    layer = quant_layer()
    layer.int8_activations = True
    x = torch.randn(64, 96)
    with torch.no_grad():
        before = layer(x)
        layer.values.neg_()  # in place, as load_state_dict writes
        codes = layouts.bitmask_to_dense(layer.bitmask, layer.values, layer.row_offsets, 96)
        after = layer(x)
    assert torch.equal(after, kernels.int8_blocks_reference(x, codes, layer.scale, layer.bias, None))
    assert not torch.equal(after, before)


def test_accelerate_encoder_sets_int8_activations_on_its_int8_layers():
    from test_encoder import sparse_copy, tiny_bert

    model = sparse_copy(tiny_bert(), SparseQuantLinear)
    ids = torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = accelerate_encoder(model).forward(input_ids=ids).logits
        layers = [m for m in model.modules() if isinstance(m, SparseQuantLinear)]
        assert layers and not any(m.int8_activations for m in layers)
        quantized = accelerate_encoder(model, int8_activations=True).forward(input_ids=ids).logits
        assert all(m.int8_activations for m in layers)
    assert not torch.equal(quantized, reference)
    torch.testing.assert_close(quantized, reference, rtol=0.05, atol=0.05)


def test_accelerate_encoder_warns_where_int8_activations_have_no_kernel():
    from test_encoder import sparse_copy, tiny_bert

    model = sparse_copy(tiny_bert(), SparseQuantLinear)
    with forced_path("torch"), pytest.warns(UserWarning, match="no kernel on the torch path"):
        accelerate_encoder(model, int8_activations=True)


def test_forced_paths_agree(two_threads):
    codes, x, row_scale, bias = case(64, 200, 300, 0.25, seed=9)
    blocks = layouts.int8_blocks(codes)
    results = {}
    for path in kernels.supported_paths():
        with forced_path(path):
            results[path] = kernels.int8_blocks_mm(x, *blocks, row_scale, 200, bias=bias)
    first = next(iter(results.values()))
    assert all(torch.equal(first, y) for y in results.values())
