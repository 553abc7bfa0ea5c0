"""The trainer: masks exactly preserved, resume bit-identical, distillation works, bad input, QAT."""

import contextlib
import copy

import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.pipeline.engine import compress_model
from secateurs.formats import StoragePlan, save_compressed
from secateurs.algorithms.quant import QuantSpec, round_to_nearest
from secateurs.structure import get_weight, set_weight
from secateurs.training.losses import LossWeights, squarehead
from secateurs.training.masks import block_linear_layers, masks_from_zeros, open_masks
from secateurs.training.progressive import GradualMagnitude, progressive_prune
from secateurs.training.qat import attach_fake_quant, bake_fake_quant, weight_parameter
from secateurs.training.trainer import PackedWindows, TrainConfig, Trainer
from training_helpers import pruned, tiny_llama, tokens

SMALL = dict(lr=3e-3, batch_size=2, seqlen=16)


def state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_masks_and_nm_exact_after_many_adamw_steps_with_decay():
    teacher = tiny_llama()
    for nm in (None, (2, 4)):
        student = pruned(teacher, 0.5, nm)
        zeros_before = {n: get_weight(m) == 0 for n, m in block_linear_layers(student).items()}
        masks = masks_from_zeros(student, nm=nm)
        config = TrainConfig(steps=12, weight_decay=0.5, losses=LossWeights(), max_grad_norm=None, **SMALL)
        seen = []
        trainer = Trainer(student, tokens(), config, teacher=teacher, masks=masks, progress=False,
                          on_step=lambda t, s: seen.append([p.grad.clone() for p, _ in t.masks.parameters()]))
        before = state(student)
        result = trainer.train()
        assert result.sparsity == {"sparsity": 0.5, "masked": 0.5}
        for name, module in block_linear_layers(student).items():
            assert torch.equal(get_weight(module) == 0, zeros_before[name])  # the kept ones all moved off 0
        assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
        for grads in seen:  # gradients of pruned weights were zero at every step
            for grad, (_, keep) in zip(grads, masks.parameters()):
                assert not bool(grad[~keep].any())
        for weight, keep in masks.parameters():  # so were the Adam moments
            moments = trainer.optimizer.state[weight]
            assert not bool(moments["exp_avg"][~keep].any()) and not bool(moments["exp_avg_sq"][~keep].any())
        if nm:
            for module in block_linear_layers(student).values():
                groups = (get_weight(module) != 0).reshape(get_weight(module).shape[0], -1, 4).sum(-1)
                assert bool((groups == 2).all())


def test_mask_check_catches_resurrected_weight_and_broken_pattern():
    student = pruned(tiny_llama(), 0.5, (2, 4))
    masks = masks_from_zeros(student, nm=(2, 4))
    weight, keep = masks.parameters()[0]
    with torch.no_grad():
        index = (~keep).nonzero()[0]
        weight[tuple(index)] = 1.0
    with pytest.raises(SecateursError, match="not 0"):
        masks.check()
    with pytest.raises(SecateursError, match="no zero weights"):
        masks_from_zeros(tiny_llama())
    with pytest.raises(SecateursError, match="2:4"):
        masks_from_zeros(pruned(tiny_llama(), 0.3), nm=(2, 4))


def test_resume_is_bit_identical(tmp_path):
    teacher = tiny_llama()
    config = TrainConfig(steps=8, warmup_steps=2, schedule="cosine", weight_decay=0.1, checkpoint_every=3,
                         grad_accum=2, **SMALL)

    def run(folder, stop_after=None):
        student = pruned(teacher, 0.5)
        trainer = Trainer(student, tokens(), config, teacher=teacher, masks=masks_from_zeros(student),
                          output_dir=folder, progress=False)
        if stop_after is not None:
            def interrupt(t, step):
                if step == stop_after:
                    raise KeyboardInterrupt
            trainer.on_step = interrupt
            with pytest.raises(KeyboardInterrupt):
                trainer.train()
            return None
        return student, trainer.train(resume=True)

    whole, whole_result = run(tmp_path / "whole")
    run(tmp_path / "parts", stop_after=7)  # the checkpoint of step 6 survives
    torch.manual_seed(12345)  # the RNG state comes back from the checkpoint
    resumed, resumed_result = run(tmp_path / "parts")
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    assert whole_result.history == resumed_result.history
    assert (tmp_path / "parts" / "loss.csv").read_text() == (tmp_path / "whole" / "loss.csv").read_text()
    changed = TrainConfig(**(config.as_dict() | {"lr": 1e-3, "losses": LossWeights()}))
    with pytest.raises(SecateursError, match="another training configuration"):
        Trainer(pruned(teacher, 0.5), tokens(), changed, teacher=teacher, output_dir=tmp_path / "parts",
                progress=False).train(resume=True)


def test_squarehead_finetuning_reduces_distance_to_teacher():
    teacher = tiny_llama(seed=3)
    student = pruned(teacher, 0.6)
    probe = tokens(64, seed=9).view(2, 32)

    def distance():
        with torch.no_grad():
            s = student(probe, output_hidden_states=True).hidden_states[1:]
            t = teacher(probe, output_hidden_states=True).hidden_states[1:]
        return squarehead(s, t).item()

    before = distance()
    config = TrainConfig(steps=40, losses=LossWeights(ce=0, squarehead=1), **SMALL)
    Trainer(student, tokens(), config, teacher=teacher, masks=masks_from_zeros(student), progress=False).train()
    assert distance() < 0.85 * before


def test_squarehead_teacher_without_its_head_gives_the_same_loss():
    """Without KL the teacher runs as its base model (no LM head): same hidden states, same loss."""
    teacher = tiny_llama(seed=3)
    student = pruned(teacher, 0.6)
    data = PackedWindows(tokens(), seqlen=16)
    inputs = data.batch(0, 2)
    calls = []
    hook = teacher.lm_head.register_forward_hook(lambda *args: calls.append(1))
    weights = LossWeights(ce=1, squarehead=1)
    loss, parts = data.loss(weights, student, teacher, inputs, contextlib.nullcontext)
    hook.remove()
    with torch.no_grad():
        full = teacher(inputs, output_hidden_states=True).hidden_states[1:]
        mine = student(inputs, output_hidden_states=True).hidden_states[1:]
    assert calls == []  # the teacher's head never ran
    assert parts["squarehead"] == pytest.approx(squarehead(mine, full).item(), rel=1e-6)
    assert parts["squarehead"] > 0


def test_bad_input_is_one_line_before_work():
    model = tiny_llama()
    with pytest.raises(SecateursError, match="vocabulary"):
        Trainer(pruned(model), tokens(), TrainConfig(steps=1, **SMALL), teacher=tiny_llama(vocab=80), progress=False)
    with pytest.raises(SecateursError, match="learning rate"):
        Trainer(model, tokens(), TrainConfig(steps=1, **(SMALL | {"lr": 0.0})), progress=False)
    with pytest.raises(SecateursError, match="fewer than one window"):
        Trainer(model, torch.tensor([], dtype=torch.long), TrainConfig(steps=1, losses=LossWeights.named("ce"), **SMALL),
                progress=False)
    with pytest.raises(SecateursError, match="need a teacher"):
        Trainer(model, tokens(), TrainConfig(steps=1, **SMALL), progress=False)
    with pytest.raises(SecateursError, match="steps or as tokens"):
        Trainer(model, tokens(), TrainConfig(**SMALL), teacher=model, progress=False)
    with pytest.raises(SecateursError, match="outside"):
        Trainer(model, tokens() + 100, TrainConfig(steps=1, losses=LossWeights.named("ce"), **SMALL), progress=False)


def test_packed_windows_visit_every_window_each_epoch():
    data = PackedWindows(torch.arange(50), 5, seed=1)
    first = data.batch(0, 10)
    assert sorted(first[:, 0].tolist()) == list(range(0, 50, 5))
    assert torch.equal(data.batch(3, 4), first[3:7])
    assert not torch.equal(data.batch(10, 10), first)  # another order next epoch
    assert TrainConfig(tokens=100, batch_size=2, seqlen=16).total_steps() == 4
    assert TrainConfig(tokens=100, batch_size=2, seqlen=16).total_steps(world=2) == 2


def test_qat_weights_on_grid_and_export_reloads_exactly(tmp_path):
    import secateurs

    teacher = tiny_llama()
    student = pruned(teacher, 0.5)
    layers = block_linear_layers(student)
    spec = QuantSpec(bits=4, group_size=16)
    grids = {}
    for name, module in layers.items():
        result = round_to_nearest(get_weight(module), spec)
        set_weight(module, result.weight)
        grids[name] = (result.scale, result.zero)
    masks = masks_from_zeros(student)
    attach_fake_quant(layers, StoragePlan(grids))
    config = TrainConfig(steps=15, losses=LossWeights(), **SMALL)
    Trainer(student, tokens(), config, teacher=teacher, masks=masks, progress=False).train()
    moved = any(not torch.equal(weight_parameter(m), m.weight) for m in layers.values())
    assert moved  # the float weights underneath drift off the grid; the forward never does
    bake_fake_quant(layers)
    for name, module in layers.items():
        scale, zero = grids[name]
        w = get_weight(module)
        codes = torch.round(w / scale.repeat_interleave(16, 1) + zero.repeat_interleave(16, 1))
        assert torch.equal(scale.repeat_interleave(16, 1) * (codes - zero.repeat_interleave(16, 1)), w)
        assert bool((codes >= 0).all() and (codes <= 15).all())
    masks.check()
    saved = save_compressed(student, StoragePlan(grids), tmp_path / "out")
    assert set(saved.formats.values()) <= {"bitmask-packed", "pack-quantized"}
    reloaded = secateurs.load(tmp_path / "out")
    probe = tokens(32).view(2, 16)
    with torch.no_grad():
        assert torch.allclose(reloaded(probe).logits, student(probe).logits, atol=1e-5)


def test_gradual_magnitude_follows_the_cubic_schedule():
    model = tiny_llama()
    masks = open_masks(model)
    pruning = GradualMagnitude(masks, 0.0, 0.6, start=0, end=6, every=2)
    config = TrainConfig(steps=8, losses=LossWeights.named("ce"), **SMALL)
    levels = []
    Trainer(model, tokens(), config, masks=masks, progress=False,
            on_step=lambda t, s: (pruning(t, s), levels.append(masks.check()["masked"]))).train()
    targets = [pruning.target(s) if s % 2 == 0 else None for s in range(1, 9)]
    assert levels[-1] == pytest.approx(0.6, abs=1e-3)
    assert all(b >= a for a, b in zip(levels, levels[1:]))
    assert levels[1] == pytest.approx(targets[1], abs=2e-3)


def test_progressive_prunes_the_finetuned_weights_further():
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    calibration = tokens(128, seed=4).view(8, 16)
    configs = [TrainConfig(steps=3, **SMALL), TrainConfig(steps=3, **SMALL)]
    results = progressive_prune(student, compress_model, [[{"sparsegpt": {"sparsity": 0.5}}], [{"sparsegpt": {"sparsity": 0.7}}]],
                                calibration, tokens(), configs, teacher=teacher, progress=False)
    assert [r.training.sparsity["sparsity"] for r in results] == pytest.approx([0.5, 0.7], abs=1e-3)


def test_mask_check_catches_a_revived_weight_and_a_broken_nm_group():
    student = pruned(tiny_llama(), nm=(2, 4))
    masks = masks_from_zeros(student, nm=(2, 4))
    name, keep = next(iter(masks.keep.items()))
    weight = get_weight(masks.layers[name])
    counted = masks.check()
    zeros = sum(int((get_weight(masks.layers[n]) == 0).sum()) for n in masks.keep)
    total = sum(k.numel() for k in masks.keep.values())
    assert counted["sparsity"] == pytest.approx(zeros / total) and counted["masked"] == pytest.approx(0.5)
    pruned_at = (~keep).nonzero()[0].tolist()
    with torch.no_grad():
        weight[tuple(pruned_at)] = 0.25  # one pruned weight comes back: the check names it
        with pytest.raises(SecateursError, match=f"layer {name}: 1 pruned weight\\(s\\) are not 0"):
            masks.check()
        weight[tuple(pruned_at)] = 0.0
        # with a mask that keeps everything, the revived weight leaves its group of 4 with 3 nonzeros
        masks.keep[name] = torch.ones_like(keep)
        weight[tuple(pruned_at)] = 0.25
        with pytest.raises(SecateursError, match="break the 2:4 pattern"):
            masks.check()


def test_bf16_autocast_trains_float32_weights_and_keeps_the_masks(monkeypatch):
    """Under bf16 autocast the weights and Adam moments stay float32, the masks exact, and the
    losses follow the float32 run's to bf16 precision."""
    import secateurs.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_has_amx", lambda: True)
    teacher = tiny_llama(seed=3)
    runs = {}
    for bf16 in (False, True):
        student = pruned(teacher, 0.5)
        masks = masks_from_zeros(student)
        config = TrainConfig(steps=6, bf16=bf16, losses=LossWeights(ce=1, squarehead=1), **SMALL)
        trainer = Trainer(student, tokens(), config, teacher=teacher, masks=masks, progress=False)
        trainer.train()
        masks.check()
        assert all(p.dtype == torch.float32 for p in student.parameters())
        assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.is_floating_point())
        runs[bf16] = [row["loss"] for row in trainer.history]
    assert runs[False] != runs[True]  # autocast did run in bf16
    for exact, reduced in zip(runs[False], runs[True]):
        assert reduced == pytest.approx(exact, rel=0.05)


def test_bf16_autocast_warns_on_a_cpu_without_amx(monkeypatch):
    import warnings

    import secateurs.training.trainer as trainer_module

    ce = LossWeights(ce=1, squarehead=0)
    config = TrainConfig(steps=1, bf16=True, losses=ce, **SMALL)
    monkeypatch.setattr(trainer_module, "cpu_has_amx", lambda: False)
    with pytest.warns(UserWarning, match="without AMX"):
        Trainer(tiny_llama(), tokens(), config, progress=False)
    monkeypatch.setattr(trainer_module, "cpu_has_amx", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(tiny_llama(), tokens(), config, progress=False)
    with warnings.catch_warnings():  # float32 never warns
        warnings.simplefilter("error")
        Trainer(tiny_llama(), tokens(), TrainConfig(steps=1, losses=ce, **SMALL), progress=False)
