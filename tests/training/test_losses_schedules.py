"""Losses against hand computations (with padding) and the schedules' values."""

import math
from types import SimpleNamespace

import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.training.losses import LossWeights, combined_loss, cross_entropy, kl_divergence, squarehead
from secateurs.training.schedules import cubic_sparsity, lr_factor
from training_helpers import tiny_llama


def test_cross_entropy_skips_padding_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    terms = []
    for b in range(2):
        for t in range(3):
            if mask[b, t] and mask[b, t + 1]:
                terms.append(-torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]].item())
    assert len(terms) == 5
    assert cross_entropy(logits, ids, mask).item() == pytest.approx(sum(terms) / 5, rel=1e-6)


def test_kl_by_hand_with_padding_and_temperature():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    T = 2.0
    total = 0.0
    for b, i in [(0, 0), (0, 1), (1, 0)]:
        p = [math.exp(v / T) for v in t[b, i].tolist()]
        q = [math.exp(v / T) for v in s[b, i].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kl_divergence(s, t, mask, T).item() == pytest.approx(total / 3 * T * T, rel=1e-5)
    assert kl_divergence(t, t, mask, T).item() == pytest.approx(0.0, abs=1e-6)


def test_squarehead_by_hand_with_padding():
    torch.manual_seed(2)
    students = [torch.randn(2, 3, 4) for _ in range(2)]
    teachers = [torch.randn(2, 3, 4) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = 0.0
    for s, t in zip(students, teachers):
        kept = [(b, i) for b in range(2) for i in range(3) if mask[b, i]]
        error = sum(((s[b, i] - t[b, i]) ** 2).sum().item() for b, i in kept) / (len(kept) * 4)
        power = sum((t[b, i] ** 2).sum().item() for b, i in kept) / (len(kept) * 4)
        expected += error / power
    assert squarehead(students, teachers, mask).item() == pytest.approx(expected, rel=1e-5)
    # padding positions do not count: changing them changes nothing
    students[0][1, 2] += 100
    assert squarehead(students, teachers, mask).item() == pytest.approx(expected, rel=1e-5)


def test_shared_denominators_make_two_halves_the_whole_batch():
    """Two processes holding one half each of a padded batch, their losses' denominators shared
    (share = the mean of both processes' values, as the trainer's all-reduce gives): the mean of the
    two losses and of their gradients is the whole batch's loss and gradient, for every part."""
    torch.manual_seed(4)
    ids = torch.randint(0, 6, (4, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    logits = torch.randn(4, 5, 6, requires_grad=True)
    hidden = [torch.randn(4, 5, 3, requires_grad=True) for _ in range(3)]
    teacher = SimpleNamespace(logits=torch.randn(4, 5, 6),
                              hidden_states=[torch.randn(4, 5, 3) * (i + 1) for i in range(3)])
    weights = LossWeights(ce=1.0, kl=0.5, squarehead=2.0, temperature=2.0)

    def loss(rows, share=None):
        student = SimpleNamespace(logits=logits[rows], hidden_states=[h[rows] for h in hidden])
        halves = SimpleNamespace(logits=teacher.logits[rows], hidden_states=[h[rows] for h in teacher.hidden_states])
        return combined_loss(weights, student, ids[rows], mask[rows], halves, share)[0]

    whole = loss(slice(0, 4))
    used = [logits, *hidden[1:]]  # hidden_states[0] is the embeddings: no SquareHead term
    expected = torch.autograd.grad(whole, used)
    halves = (slice(0, 2), slice(2, 4))
    seen = [[], []]
    for index, rows in enumerate(halves):  # each process's own denominators, in the order it shares them
        loss(rows, lambda value, index=index: seen[index].append(value) or value)
    losses = []
    for index, rows in enumerate(halves):
        other = iter(seen[1 - index])
        losses.append(loss(rows, lambda value: (value + next(other)) / 2))
    mean = (losses[0] + losses[1]) / 2
    assert mean.item() == pytest.approx(whole.item(), rel=1e-6)  # the losses compute in float32
    for got, want in zip(torch.autograd.grad(mean, used), expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)
    # without sharing, SquareHead's halves are normalized by their own teacher power: not the whole
    alone = (loss(halves[0]) + loss(halves[1])) / 2
    assert abs(alone.item() - whole.item()) > 1e-3


def test_squarehead_reads_block_outputs_last_after_final_norm():
    """hidden_states[1:] of transformers are the block outputs, the last one after the final norm."""
    model = tiny_llama()
    captured = []
    hooks = [block.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for block in model.model.layers]
    hooks.append(model.model.norm.register_forward_hook(lambda m, i, o: captured.append(o)))
    out = model(torch.randint(0, 64, (1, 8)), output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    expected = captured[:-2] + captured[-1:]
    assert len(out.hidden_states[1:]) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states[1:], expected))


def test_combined_loss_weights_parts():
    torch.manual_seed(3)
    ids = torch.randint(0, 5, (1, 4))
    make = lambda: SimpleNamespace(logits=torch.randn(1, 4, 5), hidden_states=[torch.randn(1, 4, 3) for _ in range(3)])
    student, teacher = make(), make()
    weights = LossWeights(ce=0.5, kl=2.0, squarehead=3.0, temperature=1.5)
    total, parts = combined_loss(weights, student, ids, None, teacher)
    expected = (0.5 * cross_entropy(student.logits, ids) + 2.0 * kl_divergence(student.logits, teacher.logits, None, 1.5)
                + 3.0 * squarehead(student.hidden_states[1:], teacher.hidden_states[1:]))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"ce", "kl", "squarehead", "loss"}
    assert LossWeights() == LossWeights(ce=1, kl=0, squarehead=1)
    with pytest.raises(SecateursError):
        LossWeights(ce=0, kl=0, squarehead=0)
    with pytest.raises(SecateursError):
        LossWeights(ce=-1)


def test_cubic_sparsity_values():
    assert cubic_sparsity(0, 100, 0.1, 0.7) == pytest.approx(0.1)
    assert cubic_sparsity(50, 100, 0.1, 0.7) == pytest.approx(0.7 + (0.1 - 0.7) * 0.125)
    assert cubic_sparsity(100, 100, 0.1, 0.7) == pytest.approx(0.7)
    assert cubic_sparsity(150, 100, 0.1, 0.7) == pytest.approx(0.7)
    values = [cubic_sparsity(t, 10, 0.0, 0.5) for t in range(11)]
    assert values == sorted(values)


def test_lr_factor_warmup_and_decay():
    assert [lr_factor(s, 10, 2, "linear") for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(4, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(9, 10, 0, "constant") == 1.0
    with pytest.raises(SecateursError):
        lr_factor(0, 10, 0, "step")
