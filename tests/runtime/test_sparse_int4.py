"""Bitmask-sparse 4-bit codes: the packed layout round trip, and the kernel against a float64
reference on every dispatch path (the fast one expands bytes under a mask: avx512vbmi2)."""

import pytest
import torch

from conftest import assert_matches_reference
from secateurs.runtime import SparseInt4Linear, kernels, layouts


def sparse_codes(rows, cols, density, generator):
    codes = torch.randint(0, 16, (rows, cols), generator=generator, dtype=torch.uint8)
    keep = torch.rand(rows, cols, generator=generator) < density
    keep[0] = False  # an empty row
    if rows > 2:
        keep[1] = True  # a full one (every block's 64 codes: the 32-byte load)
        keep[2, :64] = False
    return codes, keep


@pytest.mark.parametrize("density", (0.0, 0.05, 0.3, 0.5, 1.0))
def test_pack_round_trips(density):
    generator = torch.Generator().manual_seed(int(density * 100))
    codes, keep = sparse_codes(7, 192, density, generator)
    bitmask, packed, offsets = layouts.sparse_int4_pack(torch.where(keep, codes, 0), keep)
    back, kept = layouts.sparse_int4_unpack(bitmask, packed, offsets, 192)
    assert torch.equal(kept, keep) and torch.equal(back, torch.where(keep, codes, 0))
    assert packed.numel() == int(offsets[-1]) + 32  # the spare bytes


@pytest.mark.parametrize("group_size", (None, 64, 128))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_sparse_int4_kernel_matches_reference(kernel_path, group_size, dtype):
    generator = torch.Generator().manual_seed(7)
    for rows, cols, density in ((5, 64, 0.5), (9, 256, 0.3), (33, 384, 0.7), (4, 128, 1.0)):
        if group_size and cols % group_size:
            continue
        codes, keep = sparse_codes(rows, cols, density, generator)
        groups = cols // group_size if group_size else 1
        scale = torch.rand(rows, groups, generator=generator) + 0.1
        zero = torch.randint(0, 16, (rows, groups), generator=generator).float()
        module = SparseInt4Linear.from_codes(codes, keep, scale, zero, group_size)
        weight = layouts.dequantize(torch.where(keep, codes, 0), scale, zero, group_size).double() * keep
        assert torch.equal(module.to_dense().double(), weight.float().double())
        x = torch.randn(1, cols, generator=generator).to(dtype)
        y = module(x)
        assert kernels.last_kernel_path() == kernel_path
        assert_matches_reference(y, x, weight.float(), int8=True)
        big = module(torch.randn(3, cols, generator=generator))  # more rows: the dense matmul
        assert big.shape == (3, rows)


def test_non_finite_activations_take_the_fp32_walk(kernel_path):
    if kernel_path == "torch":
        pytest.skip("the torch fallback is a dense matmul: pruned zeros times inf give NaN, as in nn.Linear")
    codes, keep = sparse_codes(6, 128, 0.5, torch.Generator().manual_seed(1))
    module = SparseInt4Linear.from_codes(codes, keep, torch.ones(6, 1), torch.full((6, 1), 8.0))
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(2))
    x[0, 3] = float("inf")
    y = module(x)[0]
    weight = module.to_dense()
    touched = weight[:, 3] != 0  # rows that multiply the infinity
    assert not torch.isfinite(y[touched]).any() and torch.isfinite(y[~touched]).all()
    finite = x.clone()
    finite[0, 3] = 0
    reference = (finite.double() @ weight.double().T)[0]
    assert torch.allclose(y[~touched].double(), reference[~touched], rtol=1e-5, atol=1e-4)


def test_layout_errors():
    with pytest.raises(ValueError, match="multiples of 64"):
        layouts.sparse_int4_pack(torch.zeros(2, 60, dtype=torch.uint8), torch.ones(2, 60, dtype=torch.bool))
    with pytest.raises(ValueError, match="one activation row"):
        codes, keep = sparse_codes(2, 64, 0.5, torch.Generator().manual_seed(0))
        module = SparseInt4Linear.from_codes(codes, keep, torch.ones(2, 1), torch.zeros(2, 1))
        kernels.sparse_int4_mm(torch.randn(2, 64), module.bitmask, module.packed, module.row_offsets, module.scale,
                               module.zero, 64)


@pytest.mark.parametrize("path", ("avx512vbmi2", "avx2"))
def test_bitmask_packed_layers_pick_the_sparse_kernel_where_it_pays(path):
    from secateurs.algorithms import QuantSpec, magnitude_mask, round_to_nearest
    from secateurs.formats.registry import FORMATS, LayerSpec
    from secateurs.runtime import QuantLinear

    if path not in kernels.supported_paths():
        pytest.skip(f"{path} kernels cannot run here")
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(3))
    weight = weight * magnitude_mask(weight, 0.7)
    result = round_to_nearest(weight, QuantSpec(4, False, 64))
    quantized = torch.where(weight == 0, 0.0, result.weight)
    spec = LayerSpec("bitmask-packed", 8, 128, "float32", bits=4, group_size=64, symmetric=False)
    tensors = FORMATS["bitmask-packed"].encode(quantized, spec, (result.scale, result.zero))
    with kernels.forced_kernel_path(path):
        module = FORMATS["bitmask-packed"].module(tensors, spec, None)
    assert type(module) is (SparseInt4Linear if path == "avx512vbmi2" else QuantLinear)
    assert torch.equal(module.to_dense(), quantized)
