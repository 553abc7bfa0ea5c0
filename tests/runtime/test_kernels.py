"""Kernels against a float64 reference, on every dispatch path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_matches_reference, forced_path, int16_activations, reference_matmul, stored_weight
from secateurs.runtime import kernels, layouts
from secateurs.runtime.modules import SparseQuantLinear

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
BATCHES = (1, 3, 16, 64)
# (rows, cols): odd sizes, cols below / around / far from the vector widths, a realistic width.
SHAPES = ((1, 1), (7, 13), (33, 64), (20, 100), (19, 257), (9, 1031))


def sparse_weight(rows: int, cols: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """Random weight with an empty first row, a fully dense last row and a zero column block."""
    weight = torch.randn(rows, cols, generator=generator)
    weight *= torch.rand(rows, cols, generator=generator) < density
    weight[0] = 0
    if rows > 2:
        weight[-1] = torch.randn(cols, generator=generator)
        weight[1, : cols // 2] = 0
    return weight


def activations(batch: int, cols: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, cols, generator=generator).to(dtype)


def bitmask_case(rows, cols, density, value_dtype, generator):
    """(bitmask layout, the float32 weight it stands for, row_scale or None) of a random sparse
    weight stored as value_dtype (int8: codes with per-row scales)."""
    weight, dense, row_scale = stored_weight(sparse_weight(rows, cols, density, generator), value_dtype, generator)
    return layouts.bitmask_from_dense(weight), dense, row_scale


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("value_dtype", (torch.float32, torch.bfloat16, torch.int8))
def test_bitmask_matches_reference(kernel_path, value_dtype, batch):
    generator = torch.Generator().manual_seed(batch * 7 + hash(str(value_dtype)) % 1000)
    for rows, cols in SHAPES:
        for density in (0.0, 0.3, 0.9):
            (bitmask, values, row_offsets), dense, row_scale = bitmask_case(rows, cols, density, value_dtype, generator)
            for x_dtype in ACTIVATION_DTYPES:
                x = activations(batch, cols, x_dtype, generator)
                y = kernels.bitmask_mm(x, bitmask, values, row_offsets, cols, row_scale)
                assert kernels.last_kernel_path() == kernel_path
                assert_matches_reference(y, x, dense, int8=value_dtype == torch.int8)


@pytest.mark.parametrize("value_dtype", (torch.float32, torch.bfloat16, torch.int8))
def test_bitmask_many_tiles_matches_reference(kernel_path, value_dtype, two_threads):
    """Batches of more than one activation tile take the decode-once path (kernels:
    bitmask_rows_many_tiles): a wide layer, rows split between threads, a partial last tile."""
    generator = torch.Generator().manual_seed(3)
    rows, cols, batch = 37, 2500, 70
    for density in (0.0, 0.1, 0.6):
        layout, dense, row_scale = bitmask_case(rows, cols, density, value_dtype, generator)
        x = activations(batch, cols, torch.float32, generator)
        y = kernels.bitmask_mm(x, *layout, cols, row_scale)
        assert kernels.last_kernel_path() == kernel_path
        assert_matches_reference(y, x, dense)


@pytest.mark.parametrize("x_dtype", ACTIVATION_DTYPES)
@pytest.mark.parametrize("value_dtype", (torch.float32, torch.int8))
def test_bitmask_token_ranges_equal_one_thread(kernel_path, value_dtype, x_dtype, two_threads):
    """Batches of several whole many-tiles tiles are split between threads by token ranges (the
    last range takes the partial tile): every output equals the one-thread result bit for bit,
    with the fused epilogue, bf16 activations and outputs, and rows in groups sharing a mask."""
    if kernel_path == "torch":
        pytest.skip("no native kernel")
    generator = torch.Generator().manual_seed(11)
    rows, cols = 52, 300
    layout, dense, row_scale = bitmask_case(rows, cols, 0.3, value_dtype, generator)
    grouped, grouped_dense, grouped_scale = stored_weight(shared_mask_weight(rows, cols, 4, generator) / 64,
                                                          torch.int8, generator)
    bias = torch.randn(rows, generator=generator)
    for batch in (129, 200, 257):  # 2-16 whole tiles of 16-64 tokens on every path, then a partial one
        x = activations(batch, cols, x_dtype, generator)
        calls = ((lambda: kernels.bitmask_mm(x, *layout, cols, row_scale, bias=bias, activation="gelu"), None),
                 (lambda: kernels.bitmask_mm(x, *layouts.bitmask_from_dense(grouped), cols, grouped_scale,
                                             mask_group=4), grouped_dense))
        for call, weight in calls:
            torch.set_num_threads(2)
            split = call()
            torch.set_num_threads(1)
            assert torch.equal(split, call()) and split.dtype == x_dtype
            if weight is not None:
                assert_matches_reference(split, x, weight, int8=True)


def exact_activation(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """float64 activations from their definitions."""
    if activation == "gelu":
        return 0.5 * z * (1 + torch.special.erf(z / 2 ** 0.5))
    if activation == "gelu_pytorch_tanh":
        return 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3)))
    if activation == "silu":
        return z / (1 + torch.exp(-z))
    return z


@pytest.mark.parametrize("activation", (None, "gelu", "gelu_pytorch_tanh", "silu"))
@pytest.mark.parametrize("batch", (1, 3, 16, 70))
@pytest.mark.parametrize("value_dtype", (torch.float32, torch.int8))
def test_bitmask_fused_bias_and_activation(kernel_path, value_dtype, batch, activation, two_threads):
    """y = activation(x Wᵀ + b) on every path and batch regime (batch 1, tiles, many tiles split
    between threads): within the product's own error (activations are 1.13-Lipschitz at most)
    plus the activation's approximation error."""
    generator = torch.Generator().manual_seed(batch)
    rows, cols = 45, 300
    layout, dense, row_scale = bitmask_case(rows, cols, 0.2, value_dtype, generator)
    x = activations(batch, cols, torch.float32, generator)
    bias = torch.randn(rows, generator=generator)
    y = kernels.bitmask_mm(x, *layout, cols, row_scale, bias=bias, activation=activation)
    assert kernels.last_kernel_path() == kernel_path and y.shape == (batch, rows)
    z = reference_matmul(x, dense) + bias.double()
    plain = kernels.bitmask_mm(x, *layout, cols, row_scale)
    allowance = 1.2 * (plain.double() - reference_matmul(x, dense)).abs().amax() + 2e-6 * (1 + z.abs())
    assert ((y.double() - exact_activation(z, activation)).abs() <= allowance).all()


@pytest.mark.parametrize("activation", ("gelu", "gelu_pytorch_tanh", "silu"))
def test_fused_activations_over_their_whole_range(kernel_path, activation):
    """An identity weight puts each input through the epilogue alone: absolute error within
    2e-6 (1 + |z|) from -30 to 30, the right limits far out, NaN kept."""
    z = torch.cat([torch.linspace(-30, 30, 6001), torch.tensor([-1e4, -200.0, 200.0, 1e4])])
    eye = layouts.bitmask_from_dense(torch.eye(z.numel()))
    y = kernels.bitmask_mm(z[None], *eye, z.numel(), activation=activation)[0].double()
    assert ((y - exact_activation(z.double(), activation)).abs() <= 2e-6 * (1 + z.double().abs())).all()
    one = layouts.bitmask_from_dense(torch.ones(1, 1))
    assert kernels.bitmask_mm(torch.tensor([[float("nan")]]), *one, 1, activation=activation).isnan().all()


def test_bitmask_epilogue_rejects_bad_arguments():
    layout = layouts.bitmask_from_dense(torch.eye(4))
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.bitmask_mm(torch.ones(1, 4), *layout, 4, activation="relu6")
    with pytest.raises(ValueError, match="bias"):
        kernels.bitmask_mm(torch.ones(1, 4), *layout, 4, bias=torch.ones(3))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), batch=st.integers(1, 70),
       density=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_bitmask_random_shapes_all_native_paths(rows, cols, batch, density, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = sparse_weight(rows, cols, density, generator)
    x = activations(batch, cols, torch.float32, generator)
    layout = layouts.bitmask_from_dense(weight)
    for path in kernels.supported_paths():
        with forced_path(path):
            assert_matches_reference(kernels.bitmask_mm(x, *layout, cols), x, weight)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("value_dtype", (torch.float32, torch.bfloat16))
# 2:4, 1:2, 4:8, 8:16 and 2:3 take the vector gather where it applies; 1:4 and 3:4 the scalar loop.
@pytest.mark.parametrize("n,m", ((2, 4), (1, 2), (4, 8), (8, 16), (2, 3), (1, 4), (3, 4)))
def test_nm_matches_reference(kernel_path, value_dtype, batch, n, m):
    generator = torch.Generator().manual_seed(batch * 31 + n * 7 + m)
    for rows, groups in ((1, 1), (5, 3), (17, 64), (8, 129)):
        cols = groups * m
        weight = torch.randn(rows, cols, generator=generator).to(value_dtype)
        keep = torch.rand(rows, groups, m, generator=generator).argsort(-1).argsort(-1) < n
        weight = weight * keep.view(rows, cols)
        values, indices = layouts.nm_from_dense(weight, n, m)
        for x_dtype in ACTIVATION_DTYPES:
            x = activations(batch, cols, x_dtype, generator)
            y = kernels.nm_mm(x, values, indices, n, m)
            assert kernels.last_kernel_path() == kernel_path
            assert_matches_reference(y, x, weight)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("bits", (8, 4))
# (cols, group_size): per channel with odd / unaligned cols, vector-aligned groups, odd groups.
@pytest.mark.parametrize("cols,group_size", ((37, None), (64, -1), (256, 32), (192, 64), (96, 12), (45, 9)))
def test_quant_matches_reference(kernel_path, bits, batch, cols, group_size):
    generator = torch.Generator().manual_seed(batch * 13 + bits + cols)
    rows = 23
    groups = cols // group_size if group_size and group_size > 0 else 1
    codes = torch.randint(0, 2**bits, (rows, cols), generator=generator, dtype=torch.uint8)
    scale = torch.rand(rows, groups, generator=generator) * 0.1 + 0.01
    zero = torch.randint(0, 2**bits, (rows, groups), generator=generator).to(torch.float32)
    qweight = codes if bits == 8 else layouts.pack_int4(codes)
    weight = layouts.dequantize(codes, scale, zero, layouts.normalize_group_size(group_size, cols))
    for x_dtype in ACTIVATION_DTYPES:
        x = activations(batch, cols, x_dtype, generator)
        y = kernels.quant_mm(x, qweight, scale, zero, bits, cols, group_size)
        assert kernels.last_kernel_path() == kernel_path
        assert_matches_reference(y, x, weight, int8=True)  # both code widths take int16 activations


def test_paths_agree_on_a_large_layer(two_threads):
    """Big enough to be split between threads, on every path."""
    generator = torch.Generator().manual_seed(0)
    weight = sparse_weight(300, 2048, 0.3, generator)
    x = activations(16, 2048, torch.float32, generator)
    layout = layouts.bitmask_from_dense(weight)
    values, indices = layouts.nm_from_dense(weight * (torch.arange(2048) % 4 < 2), 2, 4)
    nm_weight = layouts.nm_to_dense(values, indices, 2, 4)
    codes, scale, zero = layouts.quantize_rtn(weight, 4, 128)
    quant_weight = layouts.dequantize(codes, scale, zero, 128)
    for path in kernels.supported_paths():
        for batch in (1, 16):
            with forced_path(path):
                xb = x[:batch]
                assert_matches_reference(kernels.bitmask_mm(xb, *layout, 2048), xb, weight)
                assert_matches_reference(kernels.nm_mm(xb, values, indices, 2, 4), xb, nm_weight)
                y = kernels.quant_mm(xb, layouts.pack_int4(codes), scale, zero, 4, 2048, 128)
                assert_matches_reference(y, xb, quant_weight, int8=True)


def test_empty_batch_and_empty_layer(kernel_path):
    weight = sparse_weight(5, 20, 0.5, torch.Generator().manual_seed(1))
    layout = layouts.bitmask_from_dense(weight)
    assert kernels.bitmask_mm(torch.zeros(0, 20), *layout, 20).shape == (0, 5)
    empty = layouts.bitmask_from_dense(torch.zeros(0, 20))
    assert kernels.bitmask_mm(torch.ones(2, 20), *empty, 20).shape == (2, 0)


def test_default_path_is_the_best_supported():
    with forced_path(None):
        assert kernels.kernel_path() == kernels.supported_paths()[0]


def test_forcing_an_unknown_or_unsupported_path_raises():
    with pytest.raises(kernels.KernelPathError, match="expected one of"), forced_path("sse9"):
        pass
    missing = [p for p in kernels.NATIVE_PATHS if p not in kernels.supported_paths()]
    if not missing:
        pytest.skip("this CPU supports every native path")
    weight = torch.eye(8)
    with forced_path(missing[0]), pytest.raises(kernels.KernelPathError, match="lacks"):
        kernels.bitmask_mm(torch.ones(1, 8), *layouts.bitmask_from_dense(weight), 8)


def _valid_bitmask_arguments():
    weight = sparse_weight(6, 20, 0.5, torch.Generator().manual_seed(2))
    bitmask, values, row_offsets = layouts.bitmask_from_dense(weight)
    return dict(x=torch.randn(2, 20), bitmask=bitmask, values=values, row_offsets=row_offsets, in_features=20)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.randn(2, 21)), "x must have shape"),
    (dict(x=torch.randn(2, 20, dtype=torch.float64)), "x must have dtype"),
    (dict(x=torch.randn(20, 2).T), "x must be contiguous"),
    (dict(x=torch.randn(2, 20, device="meta")), "x must be on the CPU"),
    (dict(x=[[0.0] * 20]), "x must be a torch.Tensor"),
    (dict(bitmask=torch.zeros(6, 2, dtype=torch.uint8)), "bitmask must have shape"),
    (dict(values=torch.zeros(3)), "row_offsets must run from 0"),
    (dict(values=torch.zeros(3, dtype=torch.float16)), "values must have dtype"),
    (dict(row_offsets=torch.zeros(6, dtype=torch.int64)), "row_offsets must have shape"),
    (dict(row_scale=torch.ones(6)), "row_scale is only for int8"),
])
def test_bitmask_rejects_bad_arguments(change, message):
    arguments = {**_valid_bitmask_arguments(), **change}
    with pytest.raises(ValueError, match=message):
        kernels.bitmask_mm(**arguments)


def test_int8_bitmask_needs_row_scale():
    arguments = _valid_bitmask_arguments()
    arguments["values"] = arguments["values"].to(torch.int8)
    with pytest.raises(ValueError, match="need row_scale"):
        kernels.bitmask_mm(**arguments)


def test_nm_and_quant_reject_bad_arguments():
    values, indices = layouts.nm_from_dense(torch.eye(4, 8), 2, 4)
    with pytest.raises(ValueError, match="indices must have shape"):
        kernels.nm_mm(torch.randn(1, 8), values, indices[:, :2].contiguous(), 2, 4)
    with pytest.raises(ValueError, match="bad N:M"):
        kernels.nm_mm(torch.randn(1, 8), values, indices, 5, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        kernels.nm_mm(torch.randn(1, 9), values, indices, 2, 4)
    qweight, scale, zero = torch.zeros(3, 8, dtype=torch.uint8), torch.ones(3, 2), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        kernels.quant_mm(torch.randn(1, 8), qweight, scale, zero, 3, 8, 4)
    with pytest.raises(ValueError, match="group_size"):
        kernels.quant_mm(torch.randn(1, 8), qweight, scale, zero, 8, 8, 3)
    with pytest.raises(ValueError, match="scale must have shape"):
        kernels.quant_mm(torch.randn(1, 8), qweight, scale, zero, 8, 8, None)
    with pytest.raises(ValueError, match="qweight must have shape"):
        kernels.quant_mm(torch.randn(1, 8), qweight, scale, zero, 4, 8, 4)


def shared_mask_weight(rows: int, cols: int, group: int, generator: torch.Generator) -> torch.Tensor:
    """int8-valued weight whose rows, in groups of `group`, share one mask (group 0 empty, the
    last group full); values never 0 where kept."""
    keep = (torch.rand(rows // group, cols, generator=generator) < 0.35).repeat_interleave(group, 0)
    keep[:group] = False
    keep[-group:] = True
    values = torch.randint(1, 128, (rows, cols), generator=generator) * (torch.randint(0, 2, (rows, cols), generator=generator) * 2 - 1)
    return (values * keep).to(torch.float32)


def int8_layers(generator: torch.Generator, cols: int):
    """(kind, run(x), dense weight, terms, takes int16) for the batch-1 int8 kernels of one width:
    int8 dense rows, int8 bitmask rows, and 8-bit codes per channel, in groups of 64 and of 32.
    terms @ |x| is the size of the sums the kernel rounds: |w| x, or for codes s q x and s z x
    apart (the zero point's term cancels most of the codes' one)."""
    rows = 21
    weight = torch.randint(-127, 128, (rows, cols), generator=generator, dtype=torch.int8)
    row_scale = torch.rand(rows, generator=generator) + 0.5
    dense = weight * row_scale[:, None]
    yield "dense", lambda x: kernels.dense_mm(x, weight, row_scale), dense, dense.abs(), True
    pruned = sparse_weight(rows, cols, 0.4, generator)  # with an empty and a fully dense row
    pruned = (pruned * 40).round().clamp(-127, 127)
    bitmask = layouts.bitmask_from_dense(pruned.to(torch.int8))
    dense = pruned * row_scale[:, None]
    yield "bitmask", lambda x: kernels.bitmask_mm(x, *bitmask, cols, row_scale), dense, dense.abs(), True
    shared = shared_mask_weight(24, cols, 4, generator)  # 4-row groups sharing a mask, one empty, one full
    group_scale = torch.rand(24, generator=generator) + 0.5
    grouped = layouts.bitmask_from_dense(shared.to(torch.int8))
    assert layouts.mask_row_group(grouped[0]) in (4, 8)
    dense = shared * group_scale[:, None]
    yield ("bitmask shared by 4 rows", lambda x: kernels.bitmask_mm(x, *grouped, cols, group_scale, mask_group=4),
           dense, dense.abs(), True)
    for group_size, takes_int16 in ((None, True), (64, True), (32, False)):
        if group_size and cols % group_size:
            continue
        groups = cols // group_size if group_size else 1
        codes = torch.randint(0, 256, (rows, cols), generator=generator, dtype=torch.uint8)
        scale = torch.rand(rows, groups, generator=generator) * 0.1 + 0.01
        zero = torch.randint(0, 256, (rows, groups), generator=generator).to(torch.float32)
        dense = layouts.dequantize(codes, scale, zero, layouts.normalize_group_size(group_size, cols))
        terms = dense.abs() + 2 * layouts.dequantize(torch.zeros_like(codes), scale, zero, layouts.normalize_group_size(group_size, cols)).abs()
        run = lambda x, c=codes, s=scale, z=zero, g=group_size: kernels.quant_mm(x, c, s, z, 8, cols, g)  # noqa: E731
        yield f"codes g{group_size}", run, dense, terms, takes_int16


@pytest.mark.parametrize("cols", (1, 37, 64, 192, 1031))
def test_int8_kernels_at_batch_1_compute_on_int16_activations(kernel_path, cols):
    """Exact on the int16-rounded x (int32 block sums), and within the rounding bound of x itself;
    groups that are not whole 64-column blocks (and batches > 1) keep fp32 activations."""
    if kernel_path == "torch":
        pytest.skip("the torch fallback computes on fp32 activations")
    generator = torch.Generator().manual_seed(cols)
    x = torch.randn(1, cols, generator=generator)
    x[0, cols // 2] = 300.0  # an outlier only coarsens its own block
    seen, bound = int16_activations(x)
    for kind, run, dense, terms, takes_int16 in int8_layers(generator, cols):
        y = run(x).double()[0]
        w = dense.double()
        exact, on_seen = w @ x.double()[0], w @ seen
        magnitude = terms.double() @ x.double()[0].abs()
        if takes_int16:
            assert ((y - on_seen).abs() <= 1e-6 * magnitude + 1e-9).all(), kind
            assert ((y - exact).abs() <= w.abs() @ bound + 1e-6 * magnitude).all(), kind
        else:
            assert ((y - exact).abs() <= 2e-6 * magnitude + 1e-9).all(), kind
        batch3 = run(x.repeat(3, 1)).double()
        assert ((batch3 - exact).abs() <= 2e-6 * magnitude + 1e-9).all(), f"{kind} at batch 3"


def test_int8_kernels_propagate_non_finite_activations(kernel_path):
    """A NaN or infinity in x skips the int16 rounding (it would hide them): the outputs are NaN/inf."""
    generator = torch.Generator().manual_seed(5)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 100, generator=generator)
        x[0, 70] = bad
        for kind, run, *_ in int8_layers(generator, 100):
            assert not run(x).isfinite().any(), kind


def test_mask_row_group_detects_shared_masks():
    generator = torch.Generator().manual_seed(3)
    for group in (2, 4, 8):
        bitmask = layouts.bitmask_from_dense(shared_mask_weight(16, 100, group, generator))[0]
        assert layouts.mask_row_group(bitmask) >= group
    bitmask = layouts.bitmask_from_dense(shared_mask_weight(16, 100, 4, generator))[0]
    bitmask[4:6, 3] ^= 1  # rows 4 and 5 differ from 6 and 7: groups of 2 hold, not those of 4 or 8
    assert layouts.mask_row_group(bitmask) == 2
    bitmask[4, 3] ^= 1  # row 4 differs from row 5
    assert layouts.mask_row_group(bitmask) == 1
    assert layouts.mask_row_group(torch.zeros(6, 2, dtype=torch.uint8)) == 2  # 6 rows: no groups of 4 or 8


@pytest.mark.parametrize("batch", (1, 3, 40, 100))
@pytest.mark.parametrize("value_dtype", (torch.float32, torch.bfloat16, torch.int8))
def test_shared_mask_rows_match_reference_on_every_path(kernel_path, value_dtype, batch):
    """mask_group changes the int8 batch-1 path and, for groups of 4 or 8, the many-tiles path
    (batches above two tiles: four rows per pass over the tile); every other case ignores it."""
    generator = torch.Generator().manual_seed(batch + (value_dtype == torch.int8))
    for rows, cols, group in ((8, 64, 4), (16, 200, 8), (12, 1031, 2), (4, 5, 4), (20, 37, 4)):
        weight, dense, row_scale = stored_weight(shared_mask_weight(rows, cols, group, generator) / 64, value_dtype, generator)
        bitmask, values, row_offsets = layouts.bitmask_from_dense(weight)
        x = activations(batch, cols, torch.float32, generator)
        y = kernels.bitmask_mm(x, bitmask, values, row_offsets, cols, row_scale, mask_group=group)
        assert_matches_reference(y, x, dense, int8=value_dtype == torch.int8)


def test_mask_group_must_be_positive():
    (bitmask, values, row_offsets), _, _ = bitmask_case(4, 8, 0.5, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mask_group"):
        kernels.bitmask_mm(torch.randn(1, 8), bitmask, values, row_offsets, 8, mask_group=0)


@pytest.mark.parametrize("batch", (1, 70))
def test_shared_mask_rows_split_between_threads(kernel_path, two_threads, batch):
    """A thread whose rows start or end inside a group gathers that group itself (batch 1), or takes
    the group's rows in its range one by one (many tiles), with the fused bias and activation."""
    if kernel_path == "torch":
        pytest.skip("no native kernel")
    generator = torch.Generator().manual_seed(5)
    for rows in (36, 44, 1020):
        weight, dense, row_scale = stored_weight(shared_mask_weight(rows, 320, 4, generator) / 64, torch.int8, generator)
        bitmask, values, row_offsets = layouts.bitmask_from_dense(weight)
        x = activations(batch, 320, torch.float32, generator)
        y = kernels.bitmask_mm(x, bitmask, values, row_offsets, 320, row_scale, mask_group=4)
        assert_matches_reference(y, x, dense, int8=True)
        bias = torch.randn(rows, generator=generator)
        fused = kernels.bitmask_mm(x, bitmask, values, row_offsets, 320, row_scale, mask_group=4, bias=bias,
                                   activation="silu")
        assert torch.allclose(fused, torch.nn.functional.silu(y + bias), atol=1e-5, rtol=1e-5)


def test_share_row_masks_restores_groups_that_rounding_broke():
    generator = torch.Generator().manual_seed(9)
    weight = shared_mask_weight(32, 200, 4, generator)
    kept = (weight != 0).nonzero()
    holes = kept[torch.randperm(len(kept), generator=generator)[:20]]
    weight[holes[:, 0], holes[:, 1]] = 0  # kept weights that an int8 rounding sent to code 0
    layout = layouts.bitmask_from_dense(weight)
    assert layouts.mask_row_group(layout[0]) == 1
    shared = layouts.share_row_masks(*layout, 200)
    assert layouts.mask_row_group(shared[0]) >= 4
    assert torch.equal(layouts.bitmask_to_dense(*shared, 200), weight)
    assert shared[1].numel() == layout[1].numel() + 20
    unrelated = layouts.bitmask_from_dense(sparse_weight(32, 200, 0.3, generator))
    assert all(a is b for a, b in zip(layouts.share_row_masks(*unrelated, 200), unrelated))
    module = SparseQuantLinear.from_codes(weight.to(torch.int8), torch.rand(32, generator=generator) + 0.5)
    assert module.mask_group >= 4
    assert torch.equal(module.to_dense(), weight * module.scale[:, None])
