"""The int8 compound of a sparse encoder: GPTQ with the mask held (against a per-example reference
of its sequential Hessians) and quantization-aware training through a fake-quant (weights end on
the grids it started from, zeros held)."""

import copy

import pytest
import torch
import transformers as tf

from secateurs.algorithms.quant import QuantSpec, round_to_nearest
from secateurs.algorithms.sparsegpt import sparsegpt
from secateurs.training.classification import ClassificationData
from secateurs.training.encoder import gptq_int8, quantization_aware_int8, round_to_int8
from secateurs.training.losses import LossWeights
from secateurs.training.masks import block_linear_layers, masks_from_zeros
from secateurs.training.trainer import TrainConfig


def sparse_classifier(seed: int = 0, sparsity: float = 0.5):
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=32, num_labels=2)
    model = tf.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for layer in block_linear_layers(model).values():
            keep = torch.rand(layer.weight.shape) >= sparsity
            layer.weight.mul_(keep)
    return model


def examples(count: int = 24, seqlen: int = 10, seed: int = 0) -> ClassificationData:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (count, seqlen), generator=generator)
    lengths = torch.randint(3, seqlen + 1, (count,), generator=generator)
    attention = (torch.arange(seqlen)[None] < lengths[:, None]).long()
    ids = torch.where(attention.bool(), ids, 0)
    return ClassificationData(ids, attention, torch.randint(0, 2, (count,), generator=generator))


def test_gptq_int8_equals_gptq_on_each_layers_sequential_hessian_over_real_tokens():
    """Reference: layer after layer, each example run alone (no padding), the layer's inputs stacked
    and H = 2 XᵀX / n in float64; then the same fixed-mask GPTQ sweep. The function batches padded
    examples and stops each forward at the layer, so this checks both the padding and the order."""
    model, data = sparse_classifier(), examples()
    reference = copy.deepcopy(model)
    spec = QuantSpec(bits=8, symmetric=True, act_order=True)
    for name, layer in block_linear_layers(reference).items():
        inputs = []
        handle = layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0][0].detach().double()))
        with torch.no_grad():
            for row in range(len(data.windows)):
                length = int(data.attention_mask[row].sum())
                reference(input_ids=data.windows[row:row + 1, :length])
        handle.remove()
        x = torch.cat(inputs)
        hessian = (2 * x.T @ x / len(x)).float()
        weight = layer.weight.detach().float()
        with torch.no_grad():
            layer.weight.copy_(sparsegpt(weight, hessian, 0.0, quant=spec, fixed_mask=weight != 0).weight)

    dense_zeros = {name: layer.weight == 0 for name, layer in block_linear_layers(model).items()}
    grids = gptq_int8(model, data, samples=len(data.windows), batch_size=5)
    for name, layer in block_linear_layers(model).items():
        expected = block_linear_layers(reference)[name].weight
        assert torch.allclose(layer.weight.detach(), expected.detach(), atol=2e-5 * float(expected.detach().abs().max())), name
        assert bool((layer.weight[dense_zeros[name]] == 0).all()), name  # pruned weights stay exactly 0
        scale, zero = grids[name]
        assert bool((zero == 128).all())  # symmetric int8: the zero point is the code of 0
        codes = layer.weight.detach() / scale  # scale * integer, up to the float product's rounding
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 128, name


def test_gptq_int8_beats_rounding_on_the_layer_objective():
    """Layer by layer on the first layer's own inputs (no earlier layer changed), GPTQ's error
    (W - Q) H (W - Q)ᵀ is below round-to-nearest's on the same grid family."""
    model, data = sparse_classifier(seed=3), examples(seed=3)
    first_name, first = next(iter(block_linear_layers(model).items()))
    original = first.weight.detach().clone()
    inputs = []
    handle = first.register_forward_pre_hook(lambda module, args: inputs.append(args[0][data.attention_mask.bool()]))
    with torch.no_grad():
        model(input_ids=data.windows, attention_mask=data.attention_mask)
    handle.remove()
    x = inputs[0].double()
    hessian = 2 * x.T @ x / len(x)
    gptq_int8(model, data, samples=len(data.windows))
    rounded = round_to_nearest(original, QuantSpec(bits=8, symmetric=True)).weight

    def error(q):
        delta = (original - q).double()
        return float(((delta @ hessian) * delta).sum())

    assert error(first.weight.detach()) < 0.9 * error(rounded)


def test_quantization_aware_int8_ends_on_its_starting_grids_with_the_zeros_held():
    model, data = sparse_classifier(seed=1), examples(seed=1)
    teacher = copy.deepcopy(model)
    masks = masks_from_zeros(model)
    zeros = {name: layer.weight == 0 for name, layer in block_linear_layers(model).items()}
    expected_grids = round_to_int8(copy.deepcopy(model))
    rounded = copy.deepcopy(model)
    round_to_int8(rounded)
    config = TrainConfig(lr=5e-3, steps=6, batch_size=4, seqlen=10, seed=0, losses=LossWeights(0.5, 0.5, 0, temperature=2.0),
                         weight_decay=0.1)
    grids, result = quantization_aware_int8(model, data, config, masks, teacher, progress=False)
    assert result.steps == 6
    moved = 0
    for name, layer in block_linear_layers(model).items():
        assert not hasattr(layer, "parametrizations"), name  # baked: a plain weight again
        scale, zero = grids[name]
        torch.testing.assert_close(scale, expected_grids[name][0], rtol=0, atol=0)
        codes = layer.weight.detach() / scale  # [rows, 1]: one group per row
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 128, name
        assert bool((layer.weight[zeros[name]] == 0).all()), name
        moved += int((layer.weight != block_linear_layers(rounded)[name].weight).sum())
    assert moved > 0  # training moved weights to neighbouring codes


@pytest.mark.parametrize("method", ["gptq", "qat"])
def test_a_bad_int8_method_or_budget_is_refused(tmp_path, method):
    from secateurs.errors import SecateursError
    from secateurs.training.encoder import prune_encoder

    with pytest.raises(SecateursError, match="int8 must be one of"):
        prune_encoder("unused", "unused", tmp_path / "out", int8="fp8")
    with pytest.raises(SecateursError, match="qat_epochs > 0"):
        prune_encoder("unused", "unused", tmp_path / "out", int8=method, qat_epochs=0, calibration=0)
