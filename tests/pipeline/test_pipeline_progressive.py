"""Progressive recipes (compression phases with finetune stages between them) through the front
door: recalibrated phases, zeros held through training, a final quantization phase, the result
written compressed; bad recipes refused before any work."""

import json

import pytest
import torch
from pipeline_helpers import calibration, save_tiny, word_text

import secateurs
from secateurs.errors import SecateursError
from secateurs.recipe import ProgressiveRecipe, RecipeError, load_recipe


def recipe(data):
    finetune = {"steps": 3, "batch": 2, "seqlen": 16, "lr": 1e-3, "data": str(data)}
    return [{"sparsegpt": {"sparsity": 0.5}}, {"finetune": finetune}, {"sparsegpt": {"sparsity": 0.7}},
            {"finetune": finetune | {"loss": "ce"}}, {"gptq": {"bits": 4, "group_size": 16}}]


def test_progressive_recipe_prunes_trains_and_quantizes(tmp_path):
    model_dir = save_tiny(tmp_path / "dense")
    (tmp_path / "train.txt").write_text(word_text(3000, seed=4))
    parsed = load_recipe(recipe(tmp_path / "train.txt"))
    assert isinstance(parsed, ProgressiveRecipe) and [f is None for _, f in parsed.phases] == [False, False, True]
    result = secateurs.oneshot(str(model_dir), parsed, calibration(), tmp_path / "out", progress=False)
    assert (tmp_path / "out.training" / "stage-2" / "checkpoint").is_dir()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # 70% sparse 4-bit: bitmask-packed, or dense 4-bit codes where that is smaller (tiny rows)
    assert {e["format"] for e in config["secateurs_compression"]["layers"].values()} <= {"bitmask-packed", "pack-quantized"}
    loaded = secateurs.load(tmp_path / "out")
    for name, module in result.model.named_modules():
        if name in config["secateurs_compression"]["layers"]:
            weight = module.weight
            assert float((weight == 0).float().mean()) == pytest.approx(0.7, abs=0.02), name
            assert torch.equal(loaded.get_submodule(name).to_dense(), weight), name
    # resuming the finished run trains nothing more and writes the same model
    again = secateurs.oneshot(str(model_dir), parsed, calibration(), tmp_path / "out", resume=True, progress=False)
    for (name, a), b in zip(result.model.named_parameters(), again.model.parameters()):
        assert torch.equal(a, b), name


def test_progressive_recipes_are_checked_first(tmp_path):
    with pytest.raises(RecipeError, match="nothing to fine-tune yet"):
        load_recipe([{"finetune": {"steps": 1}}])
    with pytest.raises(RecipeError, match="off their grid"):
        load_recipe([{"gptq": {"bits": 4}}, {"finetune": {"steps": 1}}])
    with pytest.raises(RecipeError, match="finetune.loss must be one of"):
        load_recipe([{"wanda": {"sparsity": 0.5}}, {"finetune": {"steps": 1, "loss": "mse"}}])
    model_dir = save_tiny(tmp_path / "dense")
    with pytest.raises(SecateursError, match="runs in memory"):
        secateurs.oneshot(str(model_dir), [{"wanda": {"sparsity": 0.5}}, {"finetune": {"steps": 1}}], calibration(),
                          tmp_path / "out", stream=True, progress=False)


def test_vq_phase_with_end_to_end_finetuning(tmp_path):
    """[vq, finetune]: the codes of the one-shot vq run stay, the codebooks train (KL to the original
    model), the file is the vq format decoding to the trained model; compressing after it is refused."""
    from secateurs.training.finetune import storage_plan_of

    model_dir = save_tiny(tmp_path / "dense")
    (tmp_path / "train.txt").write_text(word_text(3000, seed=4))
    vq = {"vq": {"codebooks": 1, "bits": 4, "group_size": 8, "rounds": 1, "adam_steps": 2}}
    finetune = {"steps": 4, "batch": 2, "seqlen": 16, "lr": 3e-3, "loss": "kl", "data": str(tmp_path / "train.txt")}
    secateurs.oneshot(str(model_dir), [vq], calibration(), tmp_path / "oneshot", progress=False)
    result = secateurs.oneshot(str(model_dir), [vq, {"finetune": finetune}], calibration(), tmp_path / "tuned",
                               progress=False)
    before, after = storage_plan_of(tmp_path / "oneshot"), storage_plan_of(tmp_path / "tuned")
    assert sorted(after.vq) == sorted(before.vq) and after.vq
    moved = 0
    for name, (codes, books, scales) in before.vq.items():
        assert torch.equal(after.vq[name][0], codes), name
        moved += int((after.vq[name][1] != books).sum() + (after.vq[name][2] != scales).sum())
    assert moved > 0
    loaded = secateurs.load(tmp_path / "tuned")
    for name in after.vq:
        assert torch.equal(loaded.get_submodule(name).to_dense(), result.model.get_submodule(name).weight.detach()), name
    with pytest.raises(RecipeError, match="nothing else compresses"):
        load_recipe([vq, {"finetune": finetune}, {"gptq": {"bits": 4}}])
