"""Perplexity against an independent float64 computation, and its edge cases."""

import math

import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.eval.perplexity import check_seqlen, perplexity

from foundation_helpers import MAX_POSITIONS, VOCAB, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


def reference_nll(model, ids: torch.Tensor, seqlen: int) -> tuple[float, int]:
    """Mean NLL over the L-1 predicted tokens of every whole window, each window scored alone."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - seqlen + 1, seqlen):
        window = ids[start : start + seqlen]
        with torch.no_grad():
            logits = model(window[None]).logits[0].double()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        total -= logprobs.gather(1, window[1:, None]).sum().item()
        count += seqlen - 1
    return total / count, count


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "n, seqlen, max_tokens, windows, dropped",
    [
        (4 * 16 + 5, 16, None, 4, 5),  # tail dropped
        (3 * 16, 16, None, 3, 0),  # exact multiple
        (32, 32, None, 1, 0),  # exactly one window
        (50, 32, None, 1, 18),
        (200, 16, 40, 2, 8),  # max_tokens cuts before windowing
        (64, MAX_POSITIONS, None, 1, 0),  # seqlen at the model's limit
        (7, 2, None, 3, 1),  # shortest legal window
    ],
)
def test_matches_float64_reference(model, n, seqlen, max_tokens, windows, dropped):
    ids = ids_of(n, seed=n)
    result = perplexity(model, ids, seqlen, max_tokens=max_tokens, batch_size=3, progress=False)
    expected_nll, predicted = reference_nll(model, ids[:max_tokens], seqlen)
    assert result.nll == pytest.approx(expected_nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected_nll), rel=1e-5)
    assert (result.windows, result.seqlen, result.tokens_dropped) == (windows, seqlen, dropped)
    assert result.tokens_predicted == predicted == windows * (seqlen - 1)
    assert result.tokens_evaluated == windows * seqlen
    assert result.as_dict()["tokens_per_second"] > 0


def test_windows_do_not_share_context(model):
    # Scoring the text as one long window gives a different answer than two independent windows.
    ids = ids_of(32, seed=5)
    split = perplexity(model, ids, 16, progress=False).nll
    assert split == pytest.approx(reference_nll(model, ids, 16)[0], rel=1e-5)
    assert split != pytest.approx(reference_nll(model, ids, 32)[0], rel=1e-5)


def test_batch_size_does_not_change_result(model):
    ids = ids_of(7 * 12 + 3, seed=3)
    results = [perplexity(model, ids, 12, batch_size=b, progress=False) for b in (1, 2, 5, 7, 100)]
    for result in results[1:]:
        assert result.nll == pytest.approx(results[0].nll, rel=1e-6)
        assert result.windows == results[0].windows == 7


def test_random_model_is_near_uniform(model):
    # A sanity anchor independent of the reference: a random tiny model is near-uniform over 100 tokens.
    result = perplexity(model, ids_of(256, seed=9), 32, progress=False)
    assert 50 < result.ppl < 200


@pytest.mark.parametrize("n", [0, 1, 15])
def test_too_short_text_is_an_error(model, n):
    with pytest.raises(SecateursError, match="fewer than one window"):
        perplexity(model, ids_of(n), 16, progress=False)


@pytest.mark.parametrize("max_tokens", [0, 10])
def test_max_tokens_below_one_window_is_an_error(model, max_tokens):
    with pytest.raises(SecateursError, match="fewer than one window"):
        perplexity(model, ids_of(100), 16, max_tokens=max_tokens, progress=False)


def test_negative_max_tokens_is_an_error(model):
    with pytest.raises(SecateursError, match="max_tokens"):
        perplexity(model, ids_of(100), 16, max_tokens=-1, progress=False)


@pytest.mark.parametrize("batch_size", [0, -2])
def test_bad_batch_size_is_an_error(model, batch_size):
    with pytest.raises(SecateursError, match="batch_size"):
        perplexity(model, ids_of(100), 16, batch_size=batch_size, progress=False)


@pytest.mark.parametrize("seqlen", [MAX_POSITIONS + 1, 99999])
def test_seqlen_above_context_is_an_error(model, seqlen):
    with pytest.raises(SecateursError, match="maximum context of 64"):
        perplexity(model, ids_of(100000), seqlen, progress=False)
    with pytest.raises(SecateursError, match="maximum context"):
        check_seqlen(model, seqlen)


@pytest.mark.parametrize("seqlen", [1, 0, -4])
def test_seqlen_below_two_is_an_error(model, seqlen):
    with pytest.raises(SecateursError, match="at least 2"):
        perplexity(model, ids_of(100), seqlen, progress=False)
