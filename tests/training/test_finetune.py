"""finetune(): a compressed directory in, a compressed directory out, masks and grids kept."""

import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.formats import read_compressed, save_compressed
from secateurs.formats.directory import decode_tensors
from secateurs.pipeline.engine import compress_model
from secateurs.training.finetune import finetune, storage_plan_of
from secateurs.training.losses import LossWeights
from secateurs.training.trainer import TrainConfig
from training_helpers import save_model_dir, text_file, tiny_llama, tokens, word_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    dense = tiny_llama()
    save_model_dir(dense, root / "dense")
    student = tiny_llama()
    report = compress_model(student, [{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 16}}],
                            tokens(256, seed=5).view(8, 32), progress=False)
    save_compressed(student, report.storage_plan(), root / "w4", word_tokenizer())
    return root, text_file(root / "text.txt")


def dense_weights(directory):
    stored = directory.dense | {f"{layer}.{suffix}": t for layer, parts in directory.layers.items()
                                for suffix, t in parts.items()}
    return decode_tensors(directory.specs, stored)


@pytest.mark.parametrize("qat", [True, False])
def test_finetune_keeps_masks_and_grids(folders, qat):
    root, text = folders
    config = TrainConfig(steps=3, lr=1e-2, batch_size=2, seqlen=16, losses=LossWeights())
    out = root / f"out-{qat}"
    result = finetune(root / "w4", out, config, teacher=root / "dense", data=str(text), qat=qat, progress=False)
    before, after = read_compressed(root / "w4"), read_compressed(out)
    assert after.specs == before.specs
    plan_before, plan_after = storage_plan_of(root / "w4"), storage_plan_of(out)
    for layer, (scale, zero) in plan_before.grids.items():
        assert torch.equal(plan_after.grids[layer][0], scale) and torch.equal(plan_after.grids[layer][1], zero)
    w_before, w_after = dense_weights(before), dense_weights(after)
    changed = 0
    for layer in before.specs:
        a, b = w_before[f"{layer}.weight"], w_after[f"{layer}.weight"]
        assert bool(((a == 0) <= (b == 0)).all())  # no pruned weight came back (a kept one may round to 0)
        changed += int((a != b).sum())
    assert changed > 0
    assert (result.training_dir / "loss.csv").is_file()


def test_finetune_refuses_a_dense_model_and_qat_without_grids(folders):
    root, text = folders
    config = TrainConfig(steps=1, batch_size=2, seqlen=16, losses=LossWeights.named("ce"))
    with pytest.raises(SecateursError, match="no zero weights"):
        finetune(root / "dense", root / "x", config, data=str(text), progress=False)
    with pytest.raises(SecateursError, match="needs a quantized model"):
        finetune(root / "dense", root / "x", config, data=str(text), qat=True, dense=True, progress=False)
    assert not (root / "x").exists() and not (root / "x.training").exists()
