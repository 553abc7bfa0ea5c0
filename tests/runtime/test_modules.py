"""Compressed Linear modules: exact round trips, forward == F.linear(x, to_dense()), casting."""

import pytest
import torch
import torch.nn.functional as F

from secateurs.runtime import BitmaskLinear, NMLinear, QuantLinear, SparseQuantLinear, kernels, layouts
from secateurs.runtime.modules import KERNEL_MAX_BATCH

IN, OUT = 70, 24


def pruned_weight(generator, dtype=torch.float32, density=0.4):
    weight = torch.randn(OUT, IN, generator=generator) * (torch.rand(OUT, IN, generator=generator) < density)
    weight[3] = 0
    return weight.to(dtype)


def nm_weight(generator, dtype=torch.float32, n=2, m=4):
    keep = torch.rand(OUT, IN // m * m // m, m, generator=generator).argsort(-1).argsort(-1) < n
    return (torch.randn(OUT, IN // m * m, generator=generator) * keep.view(OUT, -1)).to(dtype)


def build_modules(generator):
    """One module of every kind and storage format, with a bias."""
    bias = torch.randn(OUT, generator=generator)
    codes = torch.randint(0, 16, (OUT, IN), generator=generator, dtype=torch.uint8)
    scale, zero = torch.rand(OUT, 5, generator=generator) + 0.1, torch.full((OUT, 5), 8.0)
    return [
        BitmaskLinear.from_dense(pruned_weight(generator), bias),
        BitmaskLinear.from_dense(pruned_weight(generator, torch.bfloat16), bias, format="bf16"),
        SparseQuantLinear.from_dense(pruned_weight(generator), bias),
        NMLinear.from_dense(nm_weight(generator), bias, n=2, m=4),
        NMLinear.from_dense(nm_weight(generator, torch.bfloat16), None, format="bf16"),
        QuantLinear.from_dense(torch.randn(OUT, IN, generator=generator), bias, format="int8", group_size=14),
        QuantLinear.from_codes(codes, scale, zero, bias, format="int4", group_size=14),
        QuantLinear.from_dense(torch.randn(OUT, IN, generator=generator), None, format="int4"),
    ]


@pytest.mark.parametrize("index", range(8))
@pytest.mark.parametrize("leading", ((1,), (3,), (2, 5), (KERNEL_MAX_BATCH + 1,)))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16))
def test_forward_matches_linear_on_to_dense(kernel_path, index, leading, x_dtype):
    generator = torch.Generator().manual_seed(index * 100 + len(leading))
    module = build_modules(generator)[index].eval()
    in_features = module.in_features
    x = torch.randn(*leading, in_features, generator=generator).to(x_dtype)
    with torch.no_grad():
        y = module(x)
    expected = F.linear(x.double(), module.to_dense().double(), None if module.bias is None else module.bias.double())
    assert y.shape == (*leading, module.out_features) and y.dtype == x_dtype
    magnitude = x.double().abs() @ module.to_dense().double().abs().T + 1.0
    tolerance = 2e-5 if x_dtype == torch.float32 else 2**-7
    assert ((y.double() - expected).abs() <= tolerance * magnitude).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_sparse_round_trips_are_bit_exact(dtype):
    generator = torch.Generator().manual_seed(5)
    weight = pruned_weight(generator, dtype)
    assert torch.equal(BitmaskLinear.from_dense(weight).to_dense(), weight)
    assert BitmaskLinear.from_dense(weight).to_dense().dtype == dtype
    weight = nm_weight(generator, dtype, n=2, m=4)
    assert torch.equal(NMLinear.from_dense(weight, n=2, m=4).to_dense(), weight)
    sparse_24 = nm_weight(generator, dtype, n=1, m=4)  # groups with fewer than n nonzeros keep zeros
    assert torch.equal(NMLinear.from_dense(sparse_24, n=2, m=4).to_dense(), sparse_24)


def test_quantized_round_trips_are_exact():
    generator = torch.Generator().manual_seed(6)
    codes = torch.randint(-127, 128, (OUT, IN), generator=generator, dtype=torch.int8)
    codes[codes.abs() < 60] = 0
    scale = torch.rand(OUT, generator=generator)
    assert torch.equal(SparseQuantLinear.from_codes(codes, scale).to_dense(), codes.float() * scale[:, None])
    for format, bits in (("int8", 8), ("int4", 4)):
        codes = torch.randint(0, 2**bits, (OUT, IN), generator=generator, dtype=torch.uint8)
        scale, zero = torch.rand(OUT, 7, generator=generator), torch.randint(0, 2**bits, (OUT, 7)).float()
        module = QuantLinear.from_codes(codes, scale, zero, format=format, group_size=10)
        assert torch.equal(module.codes(), codes)
        assert torch.equal(module.to_dense(), layouts.dequantize(codes, scale, zero, 10))


def test_from_dense_quantization_is_close():
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(7))
    for format, step in (("int8", 1 / 255), ("int4", 1 / 15)):
        error = (QuantLinear.from_dense(weight, format=format, group_size=35).to_dense() - weight).abs()
        assert (error <= step * (weight.amax() - weight.amin()) / 2 + 1e-6).all()
    module = SparseQuantLinear.from_dense(weight * (weight.abs() > 1))
    assert torch.equal(module.to_dense() == 0, weight.abs() <= 1)
    assert ((module.to_dense() - weight * (weight.abs() > 1)).abs() <= module.scale[:, None] / 2 + 1e-6).all()


def test_bf16_model_cast_keeps_quantization_parameters_float32():
    generator = torch.Generator().manual_seed(8)
    model = torch.nn.Sequential(*build_modules(generator)[:7]).to(torch.bfloat16)
    assert model[2].scale.dtype == torch.float32 and model[5].zero.dtype == torch.float32
    assert model[0].values.dtype == torch.bfloat16 and model[0].bias.dtype == torch.bfloat16
    with torch.no_grad():
        for module in model:
            x = torch.randn(2, module.in_features).to(torch.bfloat16)
            assert module(x).dtype == torch.bfloat16


def test_gradients_flow_through_the_dense_path():
    module = BitmaskLinear.from_dense(pruned_weight(torch.Generator().manual_seed(9)))
    x = torch.randn(2, IN, requires_grad=True)
    module(x).sum().backward()
    assert torch.allclose(x.grad, module.to_dense().sum(0).expand(2, IN))


def test_state_dict_round_trip():
    generator = torch.Generator().manual_seed(10)
    source = build_modules(generator)[6]
    target = QuantLinear.from_codes(torch.zeros(OUT, IN, dtype=torch.uint8), torch.ones(OUT, 5), torch.zeros(OUT, 5),
                                    torch.zeros(OUT), format="int4", group_size=14)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.to_dense(), source.to_dense())


def test_torch_compile_calls_the_custom_ops():
    generator = torch.Generator().manual_seed(11)
    modules = build_modules(generator)
    model = torch.nn.Sequential(modules[0], torch.nn.ReLU(), torch.nn.Linear(OUT, IN), modules[5]).eval()
    x = torch.randn(3, IN, generator=generator)
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    targets = {str(node.target) for node in graphs[0].graph.nodes}
    assert {"secateurs.bitmask_mm.default", "secateurs.quant_mm.default"} <= targets, targets


def test_invalid_layouts_and_inputs_raise_value_error():
    generator = torch.Generator().manual_seed(12)
    weight = pruned_weight(generator)
    module = BitmaskLinear.from_dense(weight)
    with pytest.raises(ValueError, match="last dimension"):
        module(torch.randn(2, IN + 1))
    bitmask, values, row_offsets = layouts.bitmask_from_dense(weight)
    with pytest.raises(ValueError, match="popcount"):
        BitmaskLinear(bitmask, values, row_offsets.flip(0), IN)
    with pytest.raises(ValueError, match="padding bits"):
        BitmaskLinear(bitmask | 0x80, values, row_offsets, IN)
    with pytest.raises(ValueError, match="bias"):
        BitmaskLinear(bitmask, values, row_offsets, IN, torch.zeros(OUT + 1))
    with pytest.raises(ValueError, match="format"):
        BitmaskLinear.from_dense(weight, format="fp16")
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        NMLinear.from_dense(torch.ones(4, 8), n=2, m=4)
    with pytest.raises(ValueError, match="cols % m"):
        NMLinear.from_dense(torch.zeros(4, 10), n=2, m=4)
    values, indices = layouts.nm_from_dense(torch.zeros(4, 8), 2, 4)
    with pytest.raises(ValueError, match="increase within each group"):
        NMLinear(values, indices.flip(1), 2, 4)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear.from_dense(torch.randn(4, 10), group_size=3)
    with pytest.raises(ValueError, match="codes must be"):
        QuantLinear.from_codes(torch.full((4, 8), 16), torch.ones(4, 1), torch.zeros(4, 1), format="int4")
    with pytest.raises(ValueError, match="values must be int8"):
        SparseQuantLinear(*layouts.bitmask_from_dense(weight), torch.ones(OUT), IN)


def test_module_forward_reports_kernel_path(kernel_path):
    module = BitmaskLinear.from_dense(pruned_weight(torch.Generator().manual_seed(13)))
    with torch.no_grad():
        module(torch.randn(4, IN))
    assert kernels.last_kernel_path() == kernel_path


@pytest.mark.parametrize("density,kernel_above_max_batch", ((0.1, True), (0.6, False)))
def test_very_sparse_bitmask_layers_keep_their_kernel_at_large_batches(density, kernel_above_max_batch):
    """Above KERNEL_MAX_BATCH tokens a bitmask layer at most SPARSE_GEMM_MAX_DENSITY dense stays on
    its kernel (work per kept weight), a denser one takes the dense matmul."""
    generator = torch.Generator().manual_seed(17)
    weight = pruned_weight(generator, density=density)
    x = torch.randn(KERNEL_MAX_BATCH + 30, IN, generator=generator)
    for module in (BitmaskLinear.from_dense(weight), SparseQuantLinear.from_dense(weight)):
        calls = []
        original = kernels.bitmask_mm
        kernels.bitmask_mm = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
        try:
            with torch.no_grad():
                y = module(x)
        finally:
            kernels.bitmask_mm = original
        assert bool(calls) == kernel_above_max_batch
        expected = x.double() @ module.to_dense().double().T
        assert torch.allclose(y.double(), expected, rtol=1e-4, atol=1e-4)
