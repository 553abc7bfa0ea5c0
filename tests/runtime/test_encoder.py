"""Encoders on secateurs' attention kernel with fused feed-forward activations: the same outputs
as the model's own eager forward, padding included."""

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from secateurs.runtime import BitmaskLinear, SparseQuantLinear, kernels
from secateurs.runtime.encoder import (
    IMPLEMENTATION,
    accelerate_encoder,
    attention_forward,
    key_padding,
)


def tiny_bert(head_dim=16, act="gelu"):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=4 * head_dim, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, num_labels=3, hidden_act=act,
                        attn_implementation="eager")
    return BertForSequenceClassification(config).eval()


def sparse_copy(model, kind, sparsity=0.8, shared_rows=1):
    """The model with every encoder linear layer pruned by magnitude and stored as `kind`; with
    shared_rows, blocks of that many consecutive rows of a column by their norm (rows in groups
    sharing one mask)."""
    model = copy.deepcopy(model)
    for layer in model.bert.encoder.layer:
        for name, module in list(layer.named_modules()):
            if isinstance(module, torch.nn.Linear):
                weight = module.weight.detach()
                score = weight.reshape(-1, shared_rows, weight.shape[1]).norm(dim=1)
                keep = (score > score.flatten().kthvalue(int(sparsity * score.numel())).values).repeat_interleave(shared_rows, 0)
                with torch.no_grad():
                    module.weight.mul_(keep)
                layer.set_submodule(name, kind.from_dense(module.weight.detach(), module.bias.detach()))
    return model


def batch_with_padding():
    ids = torch.randint(1, 100, (3, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("kind", [BitmaskLinear, SparseQuantLinear])
def test_rows_sharing_masks_run_grouped_and_match_the_eager_forward(kernel_path, kind):
    """4-row blocks: every layer's module finds its groups, and the encoder (63 tokens: the
    batched kernel's grouped loop) gives the logits of the same weights in plain torch layers."""
    model = sparse_copy(tiny_bert(), kind, sparsity=0.75, shared_rows=4)
    assert all(m.mask_group >= 4 for m in model.modules() if isinstance(m, kind))
    reference = copy.deepcopy(model)  # the same weights as plain torch layers
    for name, module in list(reference.named_modules()):
        if isinstance(module, kind):
            linear = torch.nn.Linear(module.in_features, module.out_features)
            with torch.no_grad():
                linear.weight.copy_(module.to_dense(torch.float32))
                linear.bias.copy_(module.bias)
            reference.set_submodule(name, linear)
    ids, mask = batch_with_padding()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = accelerate_encoder(copy.deepcopy(model))(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "silu"])
@pytest.mark.parametrize("kind", [BitmaskLinear, SparseQuantLinear])
def test_accelerated_encoder_matches_its_own_forward(kernel_path, kind, act, monkeypatch):
    """The pruned model's logits through eager attention and torch activations, against the
    same model on the attention kernel with the activation fused into its bitmask layers."""
    key_masks, attention = [], kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a, **kw: key_masks.append(kw["key_mask"]) or attention(*a, **kw))
    model = sparse_copy(tiny_bert(act=act), kind)
    ids, mask = batch_with_padding()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        fast = accelerate_encoder(copy.deepcopy(model))
        got = fast(input_ids=ids, attention_mask=mask).logits
        unpadded = fast(input_ids=ids[1:2], attention_mask=torch.ones_like(ids[1:2])).logits
    assert fast.config._attn_implementation == IMPLEMENTATION
    assert len(key_masks) == 4 and torch.equal(key_masks[0], mask.bool()) and key_masks[2] is None
    assert [layer.intermediate.dense.activation for layer in fast.bert.encoder.layer] == [act, act]
    assert all(isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Identity) for layer in fast.bert.encoder.layer)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unpadded, expected[1:2], rtol=1e-4, atol=1e-5)


def test_dense_layers_keep_their_activation_and_head_dims_off_the_tile_still_work():
    """Only compressed bitmask layers fuse; a head dim of 24 runs attention through torch."""
    model = tiny_bert(head_dim=24)
    ids, mask = batch_with_padding()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        fast = accelerate_encoder(copy.deepcopy(model))
        got = fast(input_ids=ids, attention_mask=mask).logits
    assert not isinstance(fast.bert.encoder.layer[0].intermediate.intermediate_act_fn, torch.nn.Identity)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_key_padding_reads_only_masks_that_are_one_row_per_entry():
    rows = torch.tensor([[True, True, False], [False, True, True]])
    square = rows[:, None, None, :].expand(2, 1, 3, 3)
    assert torch.equal(key_padding(square, 2, 3), rows)
    assert key_padding(None, 2, 3) is None
    causal = square & torch.ones(3, 3, dtype=torch.bool).tril()
    assert key_padding(causal, 2, 3) is False
    assert key_padding(square.float(), 2, 3) is False
    assert key_padding(square.expand(2, 4, 3, 3), 2, 3) is False


def test_calls_the_kernel_cannot_take_go_to_sdpa():
    """Dropout in training, a float mask, bfloat16: transformers' SDPA result, bit for bit."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = tiny_bert().bert.encoder.layer[0].attention.self
    q, k, v = (torch.randn(2, 4, 5, 16) for _ in range(3))
    float_mask = torch.zeros(2, 1, 5, 5)
    for args, kwargs in (((q, k, v, float_mask), {}), ((q.bfloat16(), k.bfloat16(), v.bfloat16(), None), {})):
        ours, _ = attention_forward(module, *args, **kwargs)
        theirs, _ = sdpa_attention_forward(module, *args, **kwargs)
        assert torch.equal(ours, theirs)


def test_a_model_without_the_attention_interface_is_a_clear_error():
    from secateurs.errors import SecateursError

    with pytest.raises(SecateursError, match="Sequential cannot run secateurs' attention"):
        accelerate_encoder(torch.nn.Sequential(torch.nn.Linear(4, 4)))
