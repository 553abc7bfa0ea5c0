"""The error-feedback sweep of algorithms/vq_sweep.py against brute force in float64."""

import itertools

import pytest
import torch

from secateurs.algorithms import VQSpec, vq, vq_loss, vq_reconstruct
from secateurs.algorithms.vq_sweep import error_feedback_codes


def correlated(rows: int, cols: int, seed: int):
    """W and an H = 2 X X^T / n of strongly correlated inputs (as an image model's channels)."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, 400, generator=generator, dtype=torch.float64).cumsum(0) / 3
    W = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return W, 2 * X @ X.T / X.shape[1]


def half_loss(W, W_hat, H):
    return 0.5 * float(torch.trace((W - W_hat) @ H @ (W - W_hat).T))


def test_one_group_gets_the_exact_best_combination():
    W, H = correlated(5, 3, 0)
    generator = torch.Generator().manual_seed(1)
    codebooks, scales = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    codes = error_feedback_codes(W, H, codebooks, scales, percdamp=0.0)
    for row in range(5):
        best = min(itertools.product(range(4), repeat=2), key=lambda c: half_loss(
            W[row:row + 1], scales[row] * (codebooks[0, c[0]] + codebooks[1, c[1]])[None], H))
        assert tuple(codes[row, 0].tolist()) == best


def test_each_group_is_chosen_knowing_the_free_columns_compensate():
    """With two groups, the first code minimizes the loss after the best continuous second group
    (the OBS correction), found here by solving for it in float64."""
    W, H = correlated(4, 4, 2)
    generator = torch.Generator().manual_seed(3)
    codebooks, scales = torch.randn(1, 8, 2, generator=generator, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    codes = error_feedback_codes(W, H, codebooks, scales, percdamp=0.0)
    for row in range(4):
        def after_compensation(word):
            first = codebooks[0, word]
            # free second half: the error d2 = W2 - w2 minimizing d H d^T is -d1 H12 H22^-1
            w2 = W[row, 2:] + (W[row, :2] - first) @ H[:2, 2:] @ torch.linalg.inv(H[2:, 2:])
            return half_loss(W[row:row + 1], torch.cat([first, w2])[None], H)

        assert codes[row, 0, 0].item() == min(range(8), key=after_compensation)


@pytest.mark.parametrize("bits", [3, 7])  # exhaustive (8x8 combinations) and coordinate passes (128x128)
def test_sweep_beats_nearest_codewords_on_correlated_inputs_and_vq_keeps_the_better(bits):
    W, H = correlated(16, 32, 4)
    spec = VQSpec(codebooks=2, bits=bits, group_size=4)
    nearest = vq(W, H, spec, rounds=0, init="kmeans", seed=0)
    codes = error_feedback_codes(W, H, nearest.codebooks, nearest.scales)
    assert codes.shape == (16, 8, 2) and int(codes.max()) < 2**bits
    swept = vq_loss(W, vq_reconstruct(codes, nearest.codebooks, nearest.scales), H)
    assert swept < 0.5 * nearest.loss if bits == 3 else swept <= nearest.loss + 1e-20  # 7 bits: both exact
    started = vq(W, H, spec, rounds=0, seed=0)  # init="sweep": the same codebooks, the swept codes
    assert started.loss == pytest.approx(swept, rel=1e-9)
    # after the alternation too (at 7 bits both codes end exact, at rounding noise)
    assert vq(W, H, spec, rounds=3, seed=0).loss <= vq(W, H, spec, rounds=3, init="kmeans", seed=0).loss + 1e-20


def test_act_order_is_the_plain_sweep_over_groups_ordered_by_activation():
    W, H = correlated(6, 16, 7)
    H[12:, 12:] *= 50  # the last group is the most activated: swept first
    generator = torch.Generator().manual_seed(8)
    codebooks, scales = torch.randn(2, 4, 4, generator=generator, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    order = H.diagonal().reshape(4, 4).sum(1).argsort(descending=True)
    assert order[0] == 3
    columns = (order[:, None] * 4 + torch.arange(4)).flatten()
    plain = error_feedback_codes(W[:, columns], H[columns][:, columns], codebooks, scales, act_order=False)
    ordered = error_feedback_codes(W, H, codebooks, scales, act_order=True)
    assert torch.equal(ordered[:, order], plain)


def test_exact_codebooks_code_exactly():
    generator = torch.Generator().manual_seed(5)
    codebooks = torch.randn(1, 16, 4, generator=generator, dtype=torch.float64)
    truth = torch.randint(16, (6, 3, 1), generator=generator)
    scales = torch.rand(6, generator=generator, dtype=torch.float64) + 0.5
    W = vq_reconstruct(truth, codebooks, scales)
    _, H = correlated(6, 12, 6)
    codes = error_feedback_codes(W, H, codebooks, scales)
    assert torch.equal(codes, truth)
