"""Sequence classification on the one trainer: batches, the distillation loss against a direct
computation, exact resume, gradual oBERT (its Fisher from per-example gradients, its masks) and
gradual magnitude, and the scores."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from secateurs.algorithms.obert import fisher_inverse
from secateurs.errors import SecateursError
from secateurs.eval.classifier import evaluate_classifier, score_predictions
from secateurs.runtime import layouts
from secateurs.training.classification import ClassificationData
from secateurs.training.losses import LossWeights
from secateurs.training.masks import open_masks
from secateurs.training.progressive import FISHER_POSITION, GradualMagnitude, GradualOBert
from secateurs.training.trainer import TrainConfig, Trainer

VOCAB, SEQLEN = 50, 12


def tiny_bert(seed: int = 0) -> tf.BertForSequenceClassification:
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=32, num_labels=3,
                           hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return tf.BertForSequenceClassification(config).eval()


def data(count: int = 40, seed: int = 0) -> ClassificationData:
    """Label = whether token 7 appears (0), token 9 appears (1), else 2; padded at random lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (count, SEQLEN), generator=generator)
    lengths = torch.randint(4, SEQLEN + 1, (count,), generator=generator)
    mask = (torch.arange(SEQLEN)[None] < lengths[:, None]).long()
    labels = torch.randint(0, 3, (count,), generator=generator)
    ids[labels == 0, 1], ids[labels == 1, 2] = 7, 9
    return ClassificationData(ids * mask, mask, labels, seed=seed)


def config(**overrides) -> TrainConfig:
    return TrainConfig(**({"lr": 1e-3, "steps": 6, "batch_size": 4, "seqlen": SEQLEN, "seed": 0,
                           "losses": LossWeights(1, 0, 0)} | overrides))


def test_batches_follow_the_seeded_order_and_the_loss_is_distillation():
    examples = data()
    batch = examples.batch(38, 4)  # wraps into the second epoch
    rows = examples.indices(38, 4)
    assert torch.equal(batch["input_ids"], examples.windows[rows]) and torch.equal(batch["labels"], examples.labels[rows])
    student, teacher = tiny_bert(0), tiny_bert(1)
    h, temperature = 0.7, 2.0
    loss, parts = examples.loss(LossWeights(1 - h, h, 0, temperature), student, teacher, batch,
                                lambda: torch.autocast("cpu", enabled=False))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s, t = student(**inputs).logits, teacher(**inputs).logits
    kl = (F.softmax(t / temperature, -1) * (F.log_softmax(t / temperature, -1) - F.log_softmax(s / temperature, -1))).sum(-1).mean()
    expected = (1 - h) * F.cross_entropy(s, batch["labels"]) + h * temperature**2 * kl
    assert torch.allclose(loss, expected, atol=1e-6) and parts["loss"] == pytest.approx(expected.item(), abs=1e-6)


def test_training_learns_and_resumes_exactly(tmp_path):
    examples = data()
    whole = Trainer(tiny_bert(), examples, config(), progress=False)
    before = evaluate_classifier(whole.model, examples.windows, examples.attention_mask, examples.labels).accuracy
    result = whole.train()
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    def killed(trainer, step):
        if step == 4:
            raise KeyboardInterrupt

    halves = tiny_bert()
    with pytest.raises(KeyboardInterrupt):  # dropout is on: the RNG state must come back too
        Trainer(halves, examples, config(checkpoint_every=3), output_dir=tmp_path, on_step=killed, progress=False).train()
    halves = tiny_bert(seed=5)  # a fresh process: nothing but the checkpoint carries over
    Trainer(halves, examples, config(), output_dir=tmp_path, progress=False).train(resume=True)
    for (name, a), b in zip(whole.model.named_parameters(), halves.parameters()):
        assert torch.equal(a, b), name
    assert before <= 1.0


def test_labels_must_fit_the_model():
    examples = data()
    examples.labels[0] = 5
    with pytest.raises(SecateursError, match="labels must lie"):
        Trainer(tiny_bert(), examples, config(), progress=False)


@pytest.mark.parametrize("across_rows", [False, True])
def test_gradual_obert_fisher_comes_from_per_example_gradients(across_rows):
    """Per-example gradients in eval mode, flattened along rows (or down the columns, across_rows)."""
    model, examples = tiny_bert(), data()
    trainer = Trainer(model, examples, config(), masks=open_masks(model), progress=False)
    pruner = GradualOBert(trainer.masks, 0.0, 0.5, 0, 4, every=2, grads=5, grad_batch=1, block_size=8,
                          across_rows=across_rows)
    fishers = pruner.fishers(trainer, step=2)
    assert model.training is False
    name, (weight, _) = next(iter(trainer.masks.keep)), trainer.masks.parameters()[0]
    grads = []
    for sample in range(5):  # the reference: one example at a time, in eval mode, plain cross-entropy
        batch = examples.batch(FISHER_POSITION + (2 * 5 + sample), 1)
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits, batch["labels"]).backward()
        grads.append((weight.grad.t() if across_rows else weight.grad).flatten())
    expected = fisher_inverse(torch.stack(grads), block_size=8)
    assert torch.allclose(fishers[0].blocks, expected.blocks, rtol=1e-4, atol=1e-3 * float(expected.blocks.abs().max())), name


@pytest.mark.parametrize("grad_batch, per_pass", [(1, 16), (1, 2), (2, 16), (3, 4)])
def test_batched_gradient_samples_equal_one_backward_per_sample(grad_batch, per_pass, monkeypatch):
    """Gradient samples from batched passes (per-example losses, output gradients times inputs)
    equal one backward per mini-batch of grad_batch examples, whatever the examples per pass."""
    import secateurs.training.progressive as progressive

    model, examples = tiny_bert(), data()
    trainer = Trainer(model, examples, config(), masks=open_masks(model), progress=False)
    pruner = GradualOBert(trainer.masks, 0.0, 0.5, 0, 4, every=2, grads=5, grad_batch=grad_batch, block_size=8)
    model.eval()
    monkeypatch.setattr(progressive, "EXAMPLES_PER_PASS", per_pass)
    batched = [[g.clone() for g in sample] for sample in pruner.gradient_samples(trainer, step=3)]
    monkeypatch.delattr(ClassificationData, "example_losses")
    single = [[g.clone() for g in sample] for sample in pruner.gradient_samples(trainer, step=3)]
    assert len(batched) == len(single) == 5
    for one, other in zip(batched, single):
        for a, b in zip(one, other):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()) + 1e-12)


@pytest.mark.parametrize("method", ["obert", "gmp"])
@pytest.mark.parametrize("unit, across_rows", [(1, False), (4, False), (4, True)])
def test_gradual_pruning_reaches_the_schedule_with_masks_enforced(method, unit, across_rows):
    model, examples = tiny_bert(), data()
    masks = open_masks(model)
    pruner = (GradualOBert(masks, 0.2, 0.6, 1, 5, every=2, grads=4, block_size=8, unit=unit, across_rows=across_rows)
              if method == "obert" else GradualMagnitude(masks, 0.2, 0.6, 1, 5, every=2, unit=unit, across_rows=across_rows))
    trainer = Trainer(model, examples, config(steps=8), masks=masks, on_step=pruner, progress=False)
    result = trainer.train()
    total = sum(keep.numel() for keep in masks.keep.values())
    pruned = sum(int((~keep).sum()) for keep in masks.keep.values())
    assert pruned == round(0.6 * total / unit) * unit if method == "obert" else abs(pruned / total - 0.6) < 0.01
    for weight, keep in masks.parameters():
        # blocks of `unit` weights pruned whole: along a row, or down a column (rows in groups of 4 share masks)
        blocks = (keep.t() if across_rows else keep).reshape(-1, unit)
        assert bool((blocks.all(1) | ~blocks.any(1)).all())
        if across_rows:
            assert layouts.mask_row_group(layouts.pack_bitmask(keep)) >= 4
        assert not bool(weight[~keep].any())
        for value in trainer.optimizer.state[weight].values():
            if torch.is_tensor(value) and value.shape == weight.shape:
                assert not bool(value[~keep].any())
    assert result.sparsity is not None


@pytest.mark.parametrize("method", ["obert", "gmp"])
def test_gradual_pruning_with_distillation_resumes_bit_identically(tmp_path, method):
    """Killed between pruning steps and continued in a fresh process (a new model object, new masks,
    a new pruner): the same weights, masks and loss history as one uninterrupted run."""
    teacher, examples = tiny_bert(7), data()
    settings = config(steps=10, checkpoint_every=3, losses=LossWeights(0, 1, 0, temperature=2.0))

    def run(folder, kill_at=None, seed=0):
        model = tiny_bert(seed)
        model.load_state_dict(teacher.state_dict())
        masks = open_masks(model)
        pruner = (GradualOBert(masks, 0.1, 0.7, 1, 7, every=2, grads=4, block_size=8) if method == "obert"
                  else GradualMagnitude(masks, 0.1, 0.7, 1, 7, every=2))

        def on_step(trainer, step):
            pruner(trainer, step)
            if step == kill_at:
                raise KeyboardInterrupt

        trainer = Trainer(model, examples, settings, teacher=teacher, masks=masks, on_step=on_step,
                          output_dir=folder, progress=False)
        return model, masks, trainer.train(resume=True)

    whole, whole_masks, whole_result = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "parts", kill_at=8)  # after the pruning at step 7; the checkpoint of step 6 survives
    torch.manual_seed(99)  # nothing but the checkpoint carries over
    resumed, resumed_masks, resumed_result = run(tmp_path / "parts", seed=3)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert all(torch.equal(whole_masks.keep[name], resumed_masks.keep[name]) for name in whole_masks.keep)
    assert whole_result.history == resumed_result.history and whole_masks.sparsity() > 0.6


def test_scores_accuracy_and_macro_f1():
    predictions, labels = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 2, 0])
    score = score_predictions(predictions, labels, 3)
    f1 = [2 * 1 / (2 + 2), 2 * 2 / (2 + 3), 2 * 1 / (2 + 1)]
    assert score.accuracy == pytest.approx(4 / 6) and score.macro_f1 == pytest.approx(sum(f1) / 3) and score.n == 6
    model = copy.deepcopy(tiny_bert())
    examples = data()
    scored = evaluate_classifier(model, examples.windows, examples.attention_mask, examples.labels, batch_size=7)
    logits = model(input_ids=examples.windows, attention_mask=examples.attention_mask).logits
    assert scored.accuracy == pytest.approx(float((logits.argmax(-1) == examples.labels).float().mean()))
