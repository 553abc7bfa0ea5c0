import importlib
import itertools

import pytest
import torch

from secateurs.algorithms import VQSpec, beam_search_codes, vq, vq_bits, vq_gradients, vq_loss, vq_reconstruct
from secateurs.algorithms.vq import shared_codebooks

FAST = dict(rounds=3, adam_steps=20, kmeans_iters=10)


def random_spd(cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(cols, cols, generator=gen, dtype=torch.float64)
    return A @ A.T / cols + 0.1 * torch.eye(cols, dtype=torch.float64)


def random_codebooks(M: int, K: int, g: int, rows: int, groups: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codebooks = torch.randn(M, K, g, generator=gen, dtype=torch.float64)
    scales = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    codes = torch.randint(K, (rows, groups, M), generator=gen)
    return codes, codebooks, scales


def test_loss_is_the_dense_trace_and_the_output_error(problem, loss_of, error_of):
    W, X, H = problem(0, rows=12, cols=32)
    result = vq(W, H, VQSpec(codebooks=2, bits=4, group_size=4), **FAST)
    dense = torch.trace((W - result.weight) @ H @ (W - result.weight).T).item() / 2
    assert result.loss == pytest.approx(dense, rel=1e-9)
    assert result.loss == pytest.approx(loss_of(W, result.weight, H), rel=1e-9)
    # H = 2 X X^T / n, so 1/2 tr(dW H dW^T) = ||dW X||^2 / n.
    assert result.loss == pytest.approx(error_of(W, result.weight, X) / X.shape[1], rel=1e-9)
    assert vq_loss(W, result.weight, H, row_block=5) == pytest.approx(dense, rel=1e-12)


def test_layout_and_bit_exact_reconstruction(problem):
    W, _, H = problem(1, rows=10, cols=24)
    result = vq(W, H, VQSpec(codebooks=3, bits=3, group_size=6), **FAST)
    assert result.codes.dtype == torch.int32 and result.codes.shape == (10, 4, 3)
    assert 0 <= int(result.codes.min()) and int(result.codes.max()) <= 7
    assert result.codebooks.shape == (3, 8, 6) and result.scales.shape == (10,)
    assert result.weight.dtype == torch.float64
    assert torch.equal(result.weight, vq_reconstruct(result.codes, result.codebooks, result.scales))
    assert result.loss == result.losses[-1] and len(result.losses) == 1 + 2 * result.rounds


def test_float32_in_float32_out(problem):
    W, _, H = problem(2, rows=8, cols=16, dtype=torch.float32)
    result = vq(W, H, VQSpec(codebooks=2, bits=3, group_size=4), **FAST)
    assert result.weight.dtype == result.codebooks.dtype == result.scales.dtype == torch.float32
    assert all(b <= a for a, b in zip(result.losses, result.losses[1:]))


@pytest.mark.parametrize("identity", [True, False])
def test_beam_search_is_exhaustive_on_one_group(identity):
    """2 codebooks of 4 codewords, g = 2, rows one group wide: a beam of 4 keeps every first
    codeword, so the second step sees all 16 combinations. The reference enumerates them."""
    rows, g, M, K = 40, 2, 2, 4
    codes, codebooks, scales = random_codebooks(M, K, g, rows, 1, seed=3)
    W = torch.randn(rows, g, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    H = torch.eye(g, dtype=torch.float64) if identity else random_spd(g, 5)
    found = beam_search_codes(W, H, codes, codebooks, scales, beam=K)
    found_loss = vq_loss(W, vq_reconstruct(found, codebooks, scales), H)
    best_total = 0.0
    for i in range(rows):
        row_best = min(
            (scales[i] * (codebooks[0, a] + codebooks[1, b]) - W[i]) @ H @ (scales[i] * (codebooks[0, a] + codebooks[1, b]) - W[i])
            for a, b in itertools.product(range(K), repeat=2)
        ).item() / 2
        mine = vq_loss(W[i : i + 1], vq_reconstruct(found[i : i + 1], codebooks, scales[i : i + 1]), H)
        assert mine == pytest.approx(row_best, rel=1e-12, abs=1e-12)
        best_total += row_best
    assert found_loss == pytest.approx(best_total, rel=1e-12)


def test_beam_one_is_exact_coordinate_descent():
    """With H = I each position's choice is the nearest codeword to what the others leave."""
    rows, groups, g, M, K = 6, 3, 2, 2, 4
    codes, codebooks, scales = random_codebooks(M, K, g, rows, groups, seed=6)
    W = torch.randn(rows, groups * g, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    H = torch.eye(groups * g, dtype=torch.float64)
    found = beam_search_codes(W, H, codes, codebooks, scales, beam=1)
    expected = codes.clone()
    for i, j, m in itertools.product(range(rows), range(groups), range(M)):
        others = sum(codebooks[o, expected[i, j, o]] for o in range(M) if o != m)
        target = W[i, j * g : (j + 1) * g] / scales[i] - others
        expected[i, j, m] = (codebooks[m] - target).square().sum(1).argmin()
    assert torch.equal(found, expected)


def test_beam_search_never_raises_the_loss_and_wider_beams_search_more(problem):
    W, _, H = problem(8, rows=16, cols=32)
    codes, codebooks, scales = random_codebooks(2, 16, 4, 16, 8, seed=9)
    codebooks = codebooks * W.std()
    start = vq_loss(W, vq_reconstruct(codes, codebooks, scales), H)
    losses = [vq_loss(W, vq_reconstruct(beam_search_codes(W, H, codes, codebooks, scales, beam=b), codebooks, scales), H) for b in (1, 4)]
    assert max(losses) < start
    # row_block changes how rows are batched, never the result
    assert torch.equal(beam_search_codes(W, H, codes, codebooks, scales, beam=4, row_block=3), beam_search_codes(W, H, codes, codebooks, scales, beam=4))


def test_gradients_match_autograd(problem):
    W, _, H = problem(19, rows=10, cols=24)
    codes, codebooks, scales = random_codebooks(3, 8, 4, 10, 6, seed=20)
    row_losses, grad_codebooks, grad_scales = vq_gradients(W, H, codes, codebooks, scales, row_block=3)
    codebooks, scales = codebooks.clone().requires_grad_(), scales.clone().requires_grad_()
    delta = W - vq_reconstruct(codes, codebooks, scales)
    loss = torch.trace(delta @ H @ delta.T) / 2
    loss.backward()
    assert row_losses.sum().item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(grad_codebooks, codebooks.grad, rtol=1e-10, atol=1e-10)
    assert torch.allclose(grad_scales, scales.grad, rtol=1e-10, atol=1e-10)


def test_every_step_of_the_alternation_is_monotone(problem):
    W, _, H = problem(10, rows=24, cols=64)
    result = vq(W, H, VQSpec(codebooks=2, bits=5, group_size=8), beam=2, rounds=6, adam_steps=30, tol=0.0)
    steps = result.losses
    assert result.rounds == 6 and len(steps) == 13
    assert all(b <= a for a, b in zip(steps, steps[1:])), steps
    # both halves do work: the first beam search and the first Adam phase each lower the loss
    assert steps[1] < steps[0] and steps[2] < steps[1]
    assert result.loss == pytest.approx(vq_loss(W, result.weight, H), rel=1e-9)


def test_deterministic_given_a_seed(problem):
    W, _, H = problem(11, rows=8, cols=32, dtype=torch.float32)
    spec = VQSpec(codebooks=2, bits=4, group_size=8)
    first, second = vq(W, H, spec, seed=3, **FAST), vq(W, H, spec, seed=3, **FAST)
    assert torch.equal(first.codes, second.codes) and torch.equal(first.weight, second.weight)
    assert first.losses == second.losses
    assert not torch.equal(first.codebooks, vq(W, H, spec, seed=4, **FAST).codebooks)


def test_exact_when_one_codebook_holds_every_group():
    """Every row is a scaled permutation of the same 8 group vectors: one codebook of 8 codewords
    represents the layer exactly, and k-means++ finds all of them."""
    gen = torch.Generator().manual_seed(12)
    vectors = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    rows = [vectors[torch.randperm(8, generator=gen)].flatten() * (0.5 + i) for i in range(6)]
    W = torch.stack(rows)
    result = vq(W, random_spd(32, 13), VQSpec(codebooks=1, bits=3, group_size=4), **FAST)
    assert result.losses[0] < 1e-20 and result.loss < 1e-20
    assert torch.allclose(result.weight, W, rtol=0, atol=1e-12)


def test_kmeans_initialization_beats_random(problem):
    W, _, H = problem(14, rows=32, cols=64)
    spec = VQSpec(codebooks=2, bits=5, group_size=4)
    for seed in (0, 1):
        kmeans = vq(W, H, spec, init="kmeans", seed=seed, **FAST)
        rand = vq(W, H, spec, init="random", seed=seed, **FAST)
        assert kmeans.losses[0] < 0.7 * rand.losses[0]
        assert kmeans.loss < rand.loss


def test_initialization_weighs_coordinates_by_the_diagonal_of_h(problem):
    W, _, H = problem(23, rows=32, cols=64)  # diag(H) spans four decades
    spec = VQSpec(codebooks=2, bits=4, group_size=4)
    weighted = vq(W, H, spec, rounds=0)
    plain = vq(W, torch.eye(64, dtype=torch.float64), spec, rounds=0)
    assert weighted.losses[0] < 0.5 * vq_loss(W, plain.weight, H)


def test_more_codebooks_give_lower_error(problem):
    W, _, H = problem(15, rows=32, cols=128)
    two = vq(W, H, VQSpec(codebooks=2, bits=8, group_size=8), **FAST)
    three = vq(W, H, VQSpec(codebooks=3, bits=8, group_size=8), **FAST)
    assert three.loss < 0.7 * two.loss


def test_hessian_weighting_beats_the_plain_metric_under_h(problem):
    W, _, H = problem(16, rows=16, cols=64)
    spec = VQSpec(codebooks=2, bits=4, group_size=8)
    weighted = vq(W, H, spec, **FAST)
    plain = vq(W, torch.eye(64, dtype=torch.float64), spec, **FAST)
    assert weighted.loss < 0.5 * vq_loss(W, plain.weight, H)


def test_bit_count_for_576_wide_layers():
    bits = vq_bits(576, 576, VQSpec(codebooks=2, bits=8, group_size=8))
    assert bits.codes == 576 * 72 * 2 * 8  # 2 bits per weight
    assert bits.codebooks == 2 * 256 * 8 * 16 and bits.scales == 576 * 16
    assert bits.per_weight == pytest.approx(2 + 65536 / 331776 + 9216 / 331776)  # 2.2253
    assert vq_bits(576, 576, VQSpec(codebooks=3, bits=8, group_size=8)).per_weight == pytest.approx(3 + 98304 / 331776 + 9216 / 331776)
    assert vq_bits(1536, 576, VQSpec(codebooks=4, bits=8, group_size=8)).per_weight == pytest.approx(4 + 131072 / 884736 + 24576 / 884736)
    # one 2**16-entry codebook costs 25 bits per weight on its own at 576 x 576: only shared or on big layers
    assert vq_bits(576, 576, VQSpec(codebooks=1, bits=16, group_size=8)).codebooks / (576 * 576) == pytest.approx(25.28, abs=0.01)


def test_bad_shapes_and_options():
    W = torch.zeros(4, 12)
    with pytest.raises(ValueError, match="multiple of the group size"):
        vq(W, torch.eye(12), VQSpec(group_size=8))
    with pytest.raises(ValueError, match="H must have shape"):
        vq(W, torch.eye(8), VQSpec(group_size=4))
    with pytest.raises(ValueError, match="codebooks"):
        VQSpec(codebooks=0)
    with pytest.raises(ValueError, match="init"):
        vq(W, torch.eye(12), VQSpec(group_size=4), init="pca")


def test_zero_rows_are_exact(problem):
    W, _, H = problem(17, rows=6, cols=16)
    W[2] = 0
    result = vq(W, H, VQSpec(codebooks=2, bits=3, group_size=4), **FAST)
    assert torch.isfinite(result.weight).all() and torch.isfinite(result.scales).all()


def test_rounding_to_float16_for_storage(problem):
    W, _, H = problem(18, rows=16, cols=32, dtype=torch.float32)
    spec = VQSpec(codebooks=2, bits=4, group_size=8)
    exact = vq(W, H, spec, **FAST)
    rounded = vq(W, H, spec, round_to=torch.float16, **FAST)
    assert torch.equal(rounded.codebooks, rounded.codebooks.half().float()) and torch.equal(rounded.scales, rounded.scales.half().float())
    assert torch.equal(rounded.weight, vq_reconstruct(rounded.codes, rounded.codebooks, rounded.scales))
    assert len(rounded.losses) == len(exact.losses) + 2 and rounded.losses[-1] <= rounded.losses[-2]
    assert rounded.loss == pytest.approx(vq_loss(W, rounded.weight, H), rel=1e-5)
    assert rounded.loss == pytest.approx(exact.loss, rel=0.05)


def test_dead_inputs_and_a_singular_hessian(problem):
    """H needs no inverse here: dead inputs (zero rows and columns of H) cost nothing and change nothing."""
    W, X, _ = problem(21, rows=8, cols=32, tokens=12)  # rank 12 < 32
    X[[0, 9]] = 0
    H = 2 * X @ X.T / X.shape[1]
    result = vq(W, H, VQSpec(codebooks=2, bits=3, group_size=8), **FAST)
    assert all(b <= a for a, b in zip(result.losses, result.losses[1:]))
    moved = W.clone()
    moved[:, [0, 9]] += 5.0
    assert vq_loss(moved, result.weight, H) == pytest.approx(result.loss, rel=1e-9)


def test_kmeans_seeds_from_a_subset_of_many_groups(problem, monkeypatch):
    kmeans_module = importlib.import_module("secateurs.algorithms.kmeans")
    W, _, H = problem(22, rows=32, cols=64)
    spec = VQSpec(codebooks=2, bits=4, group_size=4)
    full = vq(W, H, spec, rounds=0)
    monkeypatch.setattr(kmeans_module, "KMEANS_SEED_POINTS", 64)  # of 512 groups
    subset = vq(W, H, spec, rounds=0)
    assert subset.losses[0] != full.losses[0]
    assert subset.losses[0] < 1.3 * full.losses[0] and subset.losses[0] < vq(W, H, spec, rounds=0, init="random").losses[0]


def test_shared_codebooks_hold_every_layers_groups_exactly():
    """Three layers whose rows are scaled permutations of the same 8 group vectors: one shared
    codebook of 8 codewords codes all of them exactly, and with it fixed each layer's codes and
    scales reproduce the layer."""
    gen = torch.Generator().manual_seed(40)
    vectors = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    # each row: permutations of all 8 vectors (so every row has the same RMS before its scale)
    layers = [torch.stack([torch.cat([vectors[torch.randperm(8, generator=gen)].flatten() for _ in range(copies)])
                           * (0.5 + i) for i in range(rows)]) for rows, copies in ((6, 1), (9, 2), (5, 1))]
    spec = VQSpec(codebooks=1, bits=3, group_size=4)
    books = shared_codebooks(layers, spec, kmeans_iters=10)
    assert books.shape == (1, 8, 4) and books.dtype == torch.float64
    for seed, W in enumerate(layers):
        result = vq(W, random_spd(W.shape[1], seed), spec, codebooks=books, **FAST)
        assert torch.equal(result.codebooks, books)
        assert result.loss < 1e-20 and torch.allclose(result.weight, W, rtol=0, atol=1e-12)


def test_fixed_codebooks_stay_fixed_and_the_loss_never_rises(problem):
    W, _, H = problem(41, rows=24, cols=32)
    other, _, _ = problem(42, rows=16, cols=32)
    spec = VQSpec(codebooks=2, bits=4, group_size=4)
    books = shared_codebooks([W, other], spec, [H.diagonal(), None], kmeans_iters=5).to(torch.float16).double()
    result = vq(W, H, spec, codebooks=books, round_to=torch.float16, **FAST)
    assert torch.equal(result.codebooks, books)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(result.losses[:-2], result.losses[1:-2]))
    assert torch.equal(result.weight, vq_reconstruct(result.codes, result.codebooks, result.scales))
    assert torch.equal(result.scales, result.scales.to(torch.float16).double())
    # codebooks fitted to this layer alone do at least as well as ones shared with another layer
    own = vq(W, H, spec, **FAST)
    assert own.loss <= result.loss
    with pytest.raises(ValueError, match="codebooks must have shape"):
        vq(W, H, spec, codebooks=books[:1])


def test_shared_codebooks_weigh_coordinates_by_importance(problem):
    """Weighted by diag(H), the shared codebook fits the coordinates that matter: a lower loss
    under H than the unweighted one, over both layers."""
    layers = [problem(43 + i, rows=32, cols=64) for i in range(2)]
    spec = VQSpec(codebooks=1, bits=4, group_size=4)
    weighted = shared_codebooks([W for W, _, _ in layers], spec, [H.diagonal() for _, _, H in layers])
    plain = shared_codebooks([W for W, _, _ in layers], spec)
    options = dict(FAST, rounds=0)

    def total(books):
        return sum(vq(W, H, spec, codebooks=books, **options).loss for W, _, H in layers)

    assert total(weighted) < total(plain)
    with pytest.raises(ValueError, match="at least one"):
        shared_codebooks([], spec)
