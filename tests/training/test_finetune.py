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


def _kl_to(teacher, student, ids) -> float:
    with torch.no_grad():
        target = torch.log_softmax(teacher(ids).logits.float(), -1)
        log_q = torch.log_softmax(student(ids).logits.float(), -1)
    return float((target.exp() * (target - log_q)).sum(-1).mean())


def test_finetune_of_a_vq_model_trains_codebooks_with_the_codes_fixed(folders, tmp_path):
    """AQLM-style end-to-end fine-tuning: the codes stay, codebooks and scales move toward the
    teacher (KL falls on its own training text), the embeddings stay, the file is the vq format."""
    import secateurs
    from secateurs.runtime.layouts import vq_to_dense

    root, text = folders
    student = tiny_llama(seed=0)
    recipe = [{"vq": {"codebooks": 1, "bits": 3, "group_size": 8, "rounds": 1, "adam_steps": 2}}]
    report = compress_model(student, recipe, tokens(256, seed=5).view(8, 32), progress=False)
    save_compressed(student, report.storage_plan(), tmp_path / "vq", word_tokenizer())
    config = TrainConfig(steps=6, lr=3e-3, batch_size=2, seqlen=16, losses=LossWeights.named("kl"))
    finetune(tmp_path / "vq", tmp_path / "tuned", config, teacher=root / "dense", data=str(text), progress=False)

    before, after = read_compressed(tmp_path / "vq"), read_compressed(tmp_path / "tuned")
    assert after.specs == before.specs and {spec.format for spec in after.specs.values()} == {"vq"}
    plan_before, plan_after = storage_plan_of(tmp_path / "vq"), storage_plan_of(tmp_path / "tuned")
    moved = 0
    for layer, (codes, books, scales) in plan_before.vq.items():
        new_codes, new_books, new_scales = plan_after.vq[layer]
        assert torch.equal(new_codes, codes)
        moved += int((new_books != books).sum()) + int((new_scales != scales).sum())
        decoded = dense_weights(after)[f"{layer}.weight"].float()
        assert torch.equal(decoded, vq_to_dense(new_codes, new_books, new_scales))
    assert moved > 0
    assert torch.equal(after.dense["model.embed_tokens.weight"], before.dense["model.embed_tokens.weight"])
    assert torch.equal(after.dense["lm_head.weight"], before.dense["lm_head.weight"])

    teacher = secateurs.load(root / "dense")
    ids = torch.tensor([[max(1, i) for i in tokens(1500).tolist()[:48]]])
    assert _kl_to(teacher, secateurs.load(tmp_path / "tuned"), ids) < _kl_to(teacher, secateurs.load(tmp_path / "vq"), ids)
