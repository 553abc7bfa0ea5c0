import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from secateurs.algorithms import (
    FisherInverse,
    FisherInverseBuilder,
    fisher_inverse,
    obert_prune,
    obert_scores,
    obert_update,
    restrict_fisher_inverse,
)
from secateurs.algorithms import obert as obert_module

F64 = torch.float64


def randn(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def random_keep(seed: int, shape, fraction: float, unit: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    units = torch.rand(*shape[:-1], shape[-1] // unit, generator=gen) >= fraction
    return units.repeat_interleave(unit, dim=-1)


def reference_blocks(G: torch.Tensor, block_size: int, damp: float) -> torch.Tensor:
    """inv(λI + G_bᵀ G_b / m) of every block b of B consecutive columns of G [m, d], by dense
    inversion (the last block zero-padded, as the library pads it)."""
    m, d = G.shape
    size = min(block_size, d)
    n_blocks = -(-d // size)
    padded = torch.zeros(m, n_blocks * size, dtype=F64)
    padded[:, :d] = G
    eye = torch.eye(size, dtype=F64)
    return torch.stack(
        [torch.linalg.inv(damp * eye + g.T @ g / m) for g in padded.view(m, n_blocks, size).unbind(1)]
    )


def dense(fisher: FisherInverse) -> torch.Tensor:
    """The d × d block-diagonal F⁻¹ (tests only: the library never builds it)."""
    return torch.block_diag(*fisher.blocks.unbind())[: fisher.numel, : fisher.numel]


def closed_form(w: torch.Tensor, inverse: torch.Tensor, pruned: torch.Tensor):
    """δ = -F⁻¹ E_S ([F⁻¹]_SS)⁻¹ w_S and ½ w_Sᵀ ([F⁻¹]_SS)⁻¹ w_S with a dense solve (block-diagonal
    F⁻¹, so one joint solve is every block's own)."""
    S = pruned.nonzero().flatten()
    x = torch.linalg.solve(inverse[S][:, S], w[S])
    return w - inverse[:, S] @ x, (w[S] @ x).item() / 2


def fisher_of(seed: int, shape, block_size: int, m: int = 12, damp: float = 0.05) -> FisherInverse:
    return fisher_inverse(randn(seed, m, *shape), block_size, damp, dtype=F64)


def assert_close(actual, expected, tol):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), f"max abs diff {(actual - expected).abs().max()}"


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 40),
    block_size=st.integers(1, 12),
    m=st.integers(1, 9),
    damp=st.sampled_from([1e-2, 0.3, 2.0]),
    cuts=st.lists(st.integers(0, 9), max_size=3),
    chunk=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_sherman_morrison_equals_dense_block_inverse(d, block_size, m, damp, cuts, chunk, seed):
    """Rank-1 (chunk 1) and rank-k Woodbury updates (any chunk, dividing m or not) both give the
    dense inverse of every block."""
    G = randn(seed, m, d)
    builder = FisherInverseBuilder(d, m, block_size, damp, dtype=F64, chunk=chunk)
    bounds = sorted({0, m, *(min(c, m) for c in cuts)})
    for start, end in zip(bounds, bounds[1:]):  # streamed in chunks of any size, one gradient, or none
        builder.add(G[start:end] if end - start != 1 else G[start])
    result = builder.result()
    expected = reference_blocks(G, block_size, damp)
    scale = expected.abs().max().item()
    assert_close(result.blocks / scale, expected / scale, 1e-10)
    assert_close(result.diagonal(), torch.block_diag(*expected.unbind()).diagonal()[:d], 1e-9 * scale)
    assert_close(fisher_inverse(G.view(m, 1, d), block_size, damp, dtype=F64, chunk=chunk).blocks, result.blocks, 0)


def test_float32_inverse_tracks_float64():
    G = randn(0, 64, 300) * 1e-3  # gradient-sized entries, the paper's dampening
    exact = fisher_inverse(G, 50, 1e-7, dtype=F64)
    fast = fisher_inverse(G.float(), 50, 1e-7)
    assert fast.blocks.dtype == torch.float32 and fast.blocks.shape == (6, 50, 50)
    # F⁻¹ spans 1e7 (the dampened directions) down to ~1/(σ² m⁻¹ Σ g²); compare on its own scale
    assert (fast.blocks.double() - exact.blocks).abs().max() <= 1e-4 * exact.blocks.abs().max()
    rank_one = fisher_inverse(G.float(), 50, 1e-7, chunk=1)  # the float32 Woodbury chunks track it as closely
    assert (rank_one.blocks.double() - exact.blocks).abs().max() <= 1e-4 * exact.blocks.abs().max()
    W = randn(1, 3, 100) * 0.05
    exact_step = obert_prune([W], [exact], 0.8, recomputations=2)
    fast_step = obert_prune([W.float()], [fast], 0.8, recomputations=2)
    assert torch.equal(fast_step.masks[0], exact_step.masks[0])
    error = (fast_step.weights[0].double() - exact_step.weights[0]).norm() / exact_step.weights[0].norm()
    assert error < 1e-4 and fast_step.loss == pytest.approx(exact_step.loss, rel=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 9),
    block_size=st.integers(1, 14),
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_update_equals_closed_form(rows, cols, block_size, fraction, seed):
    W = randn(seed, rows, cols)
    fisher = fisher_of(seed + 1, (rows, cols), block_size)
    keep = random_keep(seed + 2, (rows, cols), fraction)
    updated, loss = obert_update(W, fisher, keep)
    if keep.all():
        assert torch.equal(updated, W) and loss == 0
        return
    expected, expected_loss = closed_form(W.flatten(), dense(fisher), ~keep.flatten())
    assert_close(updated.flatten(), expected.masked_fill(~keep.flatten(), 0), 1e-9)
    assert (updated[~keep] == 0).all()
    assert loss == pytest.approx(expected_loss, rel=1e-9)
    # the predicted loss is the quadratic model's increase ½ δᵀ F δ
    delta = (updated - W).flatten()
    assert loss == pytest.approx((delta @ torch.linalg.solve(dense(fisher), delta)).item() / 2, rel=1e-7)


@pytest.mark.parametrize("unit, block_size", [(2, 6), (4, 8), (4, 4)])
def test_block_scores_and_update_equal_closed_form(unit, block_size):
    W = randn(3, 6, 8)
    fisher = fisher_of(4, (6, 8), block_size)
    inverse = dense(fisher)
    scores = obert_scores(W, fisher, unit=unit)
    assert scores.shape == (6, 8 // unit)
    for index, Q in enumerate(torch.arange(48).view(-1, unit)):
        w_Q = W.flatten()[Q]
        expected = (w_Q @ torch.linalg.solve(inverse[Q][:, Q], w_Q)).item() / 2
        assert scores.flatten()[index].item() == pytest.approx(expected, rel=1e-10)
    keep = random_keep(5, (6, 8), 0.5, unit)
    updated, loss = obert_update(W, fisher, keep)
    expected, expected_loss = closed_form(W.flatten(), inverse, ~keep.flatten())
    assert_close(updated.flatten(), expected.masked_fill(~keep.flatten(), 0), 1e-9)
    assert loss == pytest.approx(expected_loss, rel=1e-9)


def test_one_weight_with_the_exact_inverse_hessian_is_obs():
    d = 12
    A = randn(6, d, d)
    H = A @ A.T / d + 0.1 * torch.eye(d, dtype=F64)
    H_inv = torch.linalg.inv(H)
    w = randn(7, d)
    fisher = FisherInverse(H_inv[None].clone(), d)  # one block: the exact inverse Hessian
    scores = obert_scores(w, fisher)
    assert_close(scores, w.square() / (2 * H_inv.diagonal()), 1e-12)
    for q in range(d):
        keep = torch.ones(d, dtype=torch.bool)
        keep[q] = False
        updated, loss = obert_update(w, fisher, keep)
        assert_close(updated, (w - w[q] / H_inv[q, q] * H_inv[:, q]).masked_fill(~keep, 0), 1e-10)
        delta = updated - w
        assert loss == pytest.approx(w[q].item() ** 2 / (2 * H_inv[q, q].item()), rel=1e-10)
        assert loss == pytest.approx((delta @ H @ delta).item() / 2, rel=1e-9)  # brute-force increase
        # and no other compensation with w_q = 0 does better: the restricted least squares optimum
        R = keep.nonzero().flatten()
        best = H[R][:, R].inverse() @ H[R, q] * w[q]
        assert_close(delta[R], best, 1e-9)


@pytest.mark.parametrize("unit", [1, 3])
def test_scores_rank_like_brute_force_loss_increase(unit):
    """The quadratic ½ δᵀ F δ with F the block-diagonal Fisher: remove each unit, minimise over all
    other weights (dense solve), and rank the units by that increase."""
    rows, cols = 4, 9
    W = randn(8, rows, cols)
    fisher = fisher_of(9, (rows, cols), block_size=6, m=5, damp=0.02)
    F = torch.linalg.inv(dense(fisher))
    w = W.flatten()
    increases = []
    for Q in torch.arange(w.numel()).view(-1, unit):
        R = torch.ones(w.numel(), dtype=torch.bool)
        R[Q] = False
        delta = torch.zeros_like(w)
        delta[Q] = -w[Q]
        delta[R] = -torch.linalg.solve(F[R][:, R], F[R][:, Q] @ delta[Q])
        increases.append((delta @ F @ delta).item() / 2)
    increases = torch.tensor(increases, dtype=F64)
    scores = obert_scores(W, fisher, unit=unit).flatten()
    assert torch.equal(scores.argsort(), increases.argsort())
    assert_close(scores, increases, 1e-8 * increases.max().item())


def test_restriction_is_the_inverse_of_the_kept_fisher():
    fisher = fisher_of(10, (5, 6), block_size=7)
    keep = random_keep(11, (5, 6), 0.4)
    restricted = restrict_fisher_inverse(fisher, keep)
    kept = keep.flatten().nonzero().flatten()
    F = torch.linalg.inv(dense(fisher))
    full = dense(restricted)
    assert_close(full[kept][:, kept], torch.linalg.inv(F[kept][:, kept]), 1e-9)
    pruned = (~keep.flatten()).nonzero().flatten()
    assert torch.equal(full[pruned], torch.eye(30, dtype=F64)[pruned])  # decoupled, unit diagonal
    assert_close(restrict_fisher_inverse(restricted, keep).blocks, restricted.blocks, 1e-12)  # idempotent
    assert not torch.equal(restricted.blocks, fisher.blocks)  # a copy: the input is left alone


def layers(seed: int, shapes, block_size: int = 8):
    weights = [randn(seed + i, *shape) for i, shape in enumerate(shapes)]
    fishers = [fisher_of(seed + 100 + i, shape, block_size) for i, shape in enumerate(shapes)]
    return weights, fishers


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("recomputations", [1, 4])
def test_increments_compose_to_the_joint_closed_form(scope, recomputations):
    weights, fishers = layers(20, [(4, 8), (6, 4)])
    originals = [f.blocks.clone() for f in fishers]
    result = obert_prune(weights, fishers, 0.6, scope=scope, recomputations=recomputations)
    total = 0.0
    for W, fisher, original, updated, keep in zip(weights, fishers, originals, result.weights, result.masks):
        assert torch.equal(fisher.blocks, original)  # not in place
        expected, loss = closed_form(W.flatten(), dense(fisher), ~keep.flatten())
        assert_close(updated.flatten(), expected.masked_fill(~keep.flatten(), 0), 1e-8)
        total += loss
    assert result.loss == pytest.approx(total, rel=1e-8)


def test_one_increment_prunes_the_lowest_scores_globally():
    weights, fishers = layers(30, [(4, 8), (2, 16), (8, 2)])
    result = obert_prune(weights, fishers, 0.5)
    scores = torch.cat([obert_scores(W, f).flatten() for W, f in zip(weights, fishers)])
    kept = torch.cat([k.flatten() for k in result.masks])
    assert int((~kept).sum()) == 40 and scores[~kept].max() <= scores[kept].min()
    per_layer = obert_prune(weights, fishers, 0.5, scope="layer")
    for W, f, keep in zip(weights, fishers, per_layer.masks):
        assert int((~keep).sum()) == W.numel() // 2
        assert obert_scores(W, f)[~keep].max() <= obert_scores(W, f)[keep].min()


def test_each_increment_scores_with_the_inverse_of_the_remaining_weights():
    W = randn(45, 4, 8)
    fisher = fisher_of(46, (4, 8), block_size=16, m=6, damp=0.01)
    first = obert_prune([W], [fisher], 0.25)  # the first of two increments to 50%: 8 of 32
    restricted = restrict_fisher_inverse(fisher, first.masks[0])
    scores = obert_scores(first.weights[0], restricted, first.masks[0]).flatten()
    expected = first.masks[0].flatten().clone()
    expected[scores.argsort()[8:16]] = False  # the pruned score -inf: the 8 next lowest are new
    stale = obert_scores(first.weights[0], fisher, first.masks[0]).flatten()
    assert not torch.equal(scores.argsort()[8:16].sort().values, stale.argsort()[8:16].sort().values)
    two = obert_prune([W], [fisher], 0.5, recomputations=2)
    assert torch.equal(two.masks[0].flatten(), expected)


def test_recomputations_lower_the_loss_on_coupled_problems():
    """Not a theorem (greedy choices can lose): re-scoring on the remaining weights with their
    restricted inverse gives about 0.6x the one-shot loss on these coupled 16-blocks at 75%."""
    one_shot = increments = 0.0
    for seed in range(10):
        W = randn(seed, 8, 16)
        fisher = fisher_of(seed + 1000, (8, 16), block_size=16, m=12, damp=0.05)
        one_shot += obert_prune([W], [fisher], 0.75).loss
        increments += obert_prune([W], [fisher], 0.75, recomputations=8).loss
    assert increments < 0.8 * one_shot


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 3)), min_size=1, max_size=3),
    unit=st.sampled_from([1, 2, 4]),
    sparsity=st.floats(0, 1),
    recomputations=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_global_and_per_layer_hit_the_target_exactly(shapes, unit, sparsity, recomputations, seed):
    shapes = [(rows, groups * unit) for rows, groups in shapes]
    weights, fishers = layers(seed, shapes, block_size=4 * unit)
    units = [math.prod(shape) // unit for shape in shapes]
    for scope in ("global", "layer"):
        result = obert_prune(weights, fishers, sparsity, unit=unit, scope=scope, recomputations=recomputations)
        pruned = []
        for W, keep, updated in zip(weights, result.masks, result.weights):
            assert keep.shape == W.shape and keep.dtype == torch.bool
            grouped = keep.view(-1, unit)
            assert (grouped.all(1) | ~grouped.any(1)).all()  # whole units
            assert torch.equal(updated != 0, keep)
            pruned.append(int((~keep).sum()) // unit)
        if scope == "global":
            assert sum(pruned) == int(sparsity * sum(units) + 0.5)
        else:
            assert pruned == [int(sparsity * n + 0.5) for n in units]


def test_pruned_weights_stay_pruned():
    weights, fishers = layers(50, [(6, 8), (4, 8)])
    keeps = [random_keep(51 + i, W.shape, 0.3) for i, W in enumerate(weights)]
    dirty = [W.clone() for W in weights]  # pruned entries not yet 0: the mask wins
    step = obert_prune(dirty, fishers, 0.6, keeps=keeps, recomputations=2)
    for before, after, W in zip(keeps, step.masks, step.weights):
        assert not (after & ~before).any() and (W[~after] == 0).all()
    lower = obert_prune(step.weights, fishers, 0.1, keeps=step.masks, scope="layer")
    assert all(torch.equal(a, b) for a, b in zip(lower.masks, step.masks))
    assert all(torch.equal(a, b) for a, b in zip(lower.weights, step.weights)) and lower.loss == 0


def test_refresh_supplies_the_inverse_of_each_increment():
    weights, fishers = layers(60, [(4, 8), (4, 4)])
    calls = []

    def refresh(current, masks):
        calls.append([m.clone() for m in masks])
        for W, keep in zip(current, masks):
            assert (W[~keep] == 0).all()
        return [FisherInverse(f.blocks.clone(), f.numel) for f in fishers]  # as if recollected

    with_refresh = obert_prune(weights, fishers, 0.7, recomputations=3, refresh=refresh)
    downdated = obert_prune(weights, fishers, 0.7, recomputations=3)
    assert len(calls) == 2
    # the same Fisher recollected, restricted to the current mask, is the downdated one
    for a, b in zip(with_refresh.weights, downdated.weights):
        assert_close(a, b, 1e-9)
    assert all(torch.equal(a, b) for a, b in zip(with_refresh.masks, downdated.masks))


def test_in_place_restricts_the_given_inverses():
    weights, fishers = layers(70, [(4, 8)])
    copy = [FisherInverse(f.blocks.clone(), f.numel) for f in fishers]
    result = obert_prune(weights, copy, 0.5, recomputations=2, in_place=True)
    reference = obert_prune(weights, fishers, 0.5, recomputations=2)
    assert_close(result.weights[0], reference.weights[0], 1e-10)
    expected = restrict_fisher_inverse(fishers[0], reference_mask_after_first(weights, fishers))
    assert_close(copy[0].blocks, expected.blocks, 1e-9)


def reference_mask_after_first(weights, fishers):
    """The mask of the first of two increments to 50%: 25% of the weights by score."""
    return obert_prune(weights, fishers, 0.25).masks[0]


def test_chunked_solves_equal_one_chunk(monkeypatch):
    weights, fishers = layers(80, [(6, 8)], block_size=4)
    whole = obert_prune(weights, fishers, 0.5, recomputations=2)
    monkeypatch.setattr(obert_module, "_CHUNK_ELEMENTS", 40)  # 2 blocks of 4 × 4 at a time
    chunked = obert_prune(weights, fishers, 0.5, recomputations=2)
    assert_close(chunked.weights[0], whole.weights[0], 1e-12)
    assert torch.equal(chunked.masks[0], whole.masks[0])


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function or tensor method returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_order_d_times_b():
    shapes, block_size, m = [(40, 64), (24, 32)], 16, 6
    d = sum(math.prod(s) for s in shapes)
    weights = [randn(90 + i, *s).float() for i, s in enumerate(shapes)]
    grads = [randn(95 + i, m, *s).float() for i, s in enumerate(shapes)]
    with LargestTensor() as tracker:
        fishers = []
        for g in grads:
            builder = FisherInverseBuilder(g[0].numel(), m, block_size)
            builder.add(g[:2])
            builder.add(g[2:])
            fishers.append(builder.result())
        result = obert_prune(weights, fishers, 0.8, unit=4, recomputations=3)
        obert_prune(weights, fishers, 0.8, recomputations=2, scope="layer")
    largest_layer = max(math.prod(s) for s in shapes)
    assert [tuple(f.blocks.shape) for f in fishers] == [(160, 16, 16), (48, 16, 16)]
    assert tracker.largest <= largest_layer * block_size < d * d // 100
    assert result.weights[0].dtype == torch.float32


def test_mixed_dtypes_keep_the_weight_dtype():
    W = randn(1, 4, 8).float()
    fisher = fisher_of(2, (4, 8), 8)  # float64 inverse
    result = obert_prune([W], [fisher], 0.5)
    assert result.weights[0].dtype == torch.float32 and obert_scores(W, fisher).dtype == F64


def test_bad_input_is_refused():
    W = randn(0, 4, 6)
    fisher = fisher_of(1, (4, 6), 6)
    builder = FisherInverseBuilder(24, 2, 6)
    with pytest.raises(ValueError, match="expects 2 gradients"):
        builder.result()
    builder.add(torch.zeros(2, 24))
    with pytest.raises(ValueError, match="3 gradients added"):
        builder.add(torch.zeros(24))
    with pytest.raises(ValueError, match="NaN"):
        FisherInverseBuilder(24, 2, 6).add(torch.full((24,), math.nan))
    with pytest.raises(ValueError, match="elements expected"):
        FisherInverseBuilder(24, 2, 6).add(torch.zeros(25))
    with pytest.raises(ValueError, match="damp"):
        FisherInverseBuilder(24, 2, 6, damp=0.0)
    with pytest.raises(ValueError, match="FisherInverse of 24"):
        obert_scores(randn(0, 5, 6), fisher)
    with pytest.raises(ValueError, match="unit 4"):
        obert_scores(W, fisher, unit=4)  # 6 columns
    with pytest.raises(ValueError, match="part of a unit"):
        keep = torch.ones(4, 6, dtype=torch.bool)
        keep[0, 0] = False
        obert_prune([W], [fisher], 0.5, keeps=[keep], unit=2)
    with pytest.raises(ValueError, match="scope"):
        obert_prune([W], [fisher], 0.5, scope="row")
    with pytest.raises(ValueError, match="sparsity"):
        obert_prune([W], [fisher], 1.5)
    with pytest.raises(ValueError, match="cover"):
        FisherInverse(torch.eye(4, dtype=F64)[None], 5)


def test_fisher_of_masked_gradients_is_decoupled_and_restricts_without_change():
    """Gradients that are 0 on pruned weights give an inverse with [F⁻¹]_RP = 0: restricting it to the
    kept weights only puts the identity on the pruned rows and columns (the solve is skipped)."""
    keep = torch.rand(6, 20, generator=torch.Generator().manual_seed(3)) > 0.4
    G = randn(4, 16, 6, 20) * keep
    fisher = fisher_inverse(G, 8, 0.1, dtype=F64)
    restricted = restrict_fisher_inverse(fisher, keep)
    pruned = ~keep.flatten().view(-1, 8)  # 120 weights: 15 blocks of 8
    both = pruned[:, :, None] | pruned[:, None, :]
    assert torch.equal(restricted.blocks, torch.where(both, torch.eye(8, dtype=F64), fisher.blocks))


def test_woodbury_falls_back_to_rank_one_updates_when_a_factorization_fails(monkeypatch):
    G = randn(5, 7, 30)
    rank_one = fisher_inverse(G, 10, 0.1, dtype=F64, chunk=1)
    factorize = torch.linalg.cholesky_ex

    def failing_for_chunks(S):
        L, info = factorize(S)
        return L, info + (S.shape[-1] > 1)  # as if rounding broke every k x k system

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_for_chunks)
    assert torch.equal(fisher_inverse(G, 10, 0.1, dtype=F64, chunk=4).blocks, rank_one.blocks)
