"""The sequential engine on tiny random models of several architectures."""

import pytest
import torch
import transformers as tf

from secateurs.errors import SecateursError
from secateurs.structure import find_blocks, get_weight, linear_layers
from secateurs.pipeline.engine import Engine, compress_model
from secateurs.algorithms.hessian import HessianAccumulator
from secateurs.recipe import load_recipe

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, **COMMON)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                               num_attention_heads=4, num_key_value_heads=2, **COMMON)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, **COMMON)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        **COMMON)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                                  word_embed_proj_dim=64, **COMMON)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB)),
}


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return CONFIGS[arch]().eval()


def calibration(samples=6, seqlen=32, seed=1):
    return torch.randint(0, VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def targeted(model):
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in linear_layers(b).items()}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_every_architecture_compresses_to_exact_sparsity(arch):
    model = tiny(arch)
    head_before = model.get_output_embeddings().weight.clone()
    report = compress_model(model, "sparsegpt-50", calibration(), progress=False)
    layers = targeted(model)
    assert len(report.layers) == len(layers) > 0
    for name, module in layers.items():
        weight = get_weight(module)
        assert (weight == 0).sum().item() == weight.numel() // 2, name
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    with torch.no_grad():
        assert torch.isfinite(model(calibration(2)).logits).all()


def test_gpt2_conv1d_weights_are_handled_transposed():
    model = tiny("gpt2")
    compress_model(model, [{"sparsegpt": {"mask": "2:4"}}], calibration(), progress=False)
    conv = model.transformer.h[0].attn.c_attn  # weight [in, out]; groups run along the input dim
    groups = (conv.weight.t() != 0).reshape(conv.weight.shape[1], -1, 4).sum(-1)
    assert torch.all(groups == 2)


def test_true_sequential_groups_llama_in_execution_order():
    model = tiny("llama")
    engine = Engine(model, load_recipe({"stages": [{"sparsegpt": {"sparsity": 0.5}}], "true_sequential": True}),
                    device="cpu", progress=False)
    from secateurs.pipeline.capture import capture_block_inputs

    inputs = capture_block_inputs(model, engine.blocks, calibration(2), 2)
    groups = engine._gather(engine.blocks[0], engine._block_layers(0), inputs, 0, accumulate=False).groups()
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("true_sequential", [False, True])
def test_next_block_sees_compressed_outputs(true_sequential):
    """The loss the engine reports for block 1 equals ½ΣΔwᵀHΔw with H measured on the *compressed*
    model's block-1 inputs: so block 1 was calibrated on block 0's compressed outputs."""
    model = tiny("llama")
    original = {n: get_weight(m).clone() for n, m in targeted(model).items()}
    ids = calibration()
    recipe = load_recipe({"stages": [{"sparsegpt": {"sparsity": 0.5}}], "true_sequential": true_sequential})
    report = compress_model(model, recipe, ids, progress=False)
    name = "model.layers.1.self_attn.q_proj"
    accumulator = HessianAccumulator(64, torch.float64)
    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: accumulator.add(a[0]))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    delta = (original[name] - get_weight(targeted(model)[name])).double()
    expected = 0.5 * ((delta @ accumulator.hessian()) * delta).sum().item()
    reported = next(layer.loss for layer in report.layers if layer.name == name)
    assert reported == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("columns", [5, 200, 577, 1536])
def test_hessian_accumulator_matches_dense_xtx(columns):
    """Only the upper block triangle is accumulated; hessian() must still be the full 2 XᵀX / n,
    also after merging partial sums."""
    generator = torch.Generator().manual_seed(columns)
    chunks = [torch.randn(2, 7, columns, generator=generator, dtype=torch.float64) for _ in range(3)]
    first, second = HessianAccumulator(columns, torch.float64), HessianAccumulator(columns, torch.float64)
    for chunk in chunks[:2]:
        first.add(chunk)
    second.add(chunks[2])
    first.merge(second.sum, second.count)
    x = torch.cat([c.reshape(-1, columns) for c in chunks])
    torch.testing.assert_close(first.hessian(), 2 * x.T @ x / x.shape[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first.column_norms(), x.norm(dim=0), rtol=1e-12, atol=1e-12)


def test_diagonal_accumulator_gives_the_column_norms_only():
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 7, 33, generator=generator, dtype=torch.float64) for _ in range(2)]
    first, second = HessianAccumulator(33, torch.float64, full=False), HessianAccumulator(33, torch.float64, full=False)
    first.add(chunks[0])
    second.add(chunks[1])
    first.merge(second.sum, second.count)
    x = torch.cat([c.reshape(-1, 33) for c in chunks])
    torch.testing.assert_close(first.column_norms(), x.norm(dim=0), rtol=1e-12, atol=1e-12)
    assert first.count == x.shape[0]
    with pytest.raises(ValueError, match="only the diagonal"):
        first.hessian()


def test_wanda_gathers_column_norms_without_hessians(monkeypatch):
    """A Wanda-only recipe accumulates no XᵀX (the diagonal is all it reads), reports no loss, and
    prunes block 0 exactly as Wanda on that block's dense inputs; beside GPTQ it gets Hessians."""
    from secateurs.algorithms import wanda_mask
    from secateurs.pipeline import statistics

    created = []
    original_init = statistics.HessianAccumulator.__init__

    def spy(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append(self.full)

    monkeypatch.setattr(statistics.HessianAccumulator, "__init__", spy)
    model = tiny("llama")
    q_proj = model.model.layers[0].self_attn.q_proj
    dense = q_proj.weight.detach().clone()
    inputs = []
    handle = q_proj.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    with torch.no_grad():
        model(calibration(), use_cache=False)
    handle.remove()
    report = compress_model(model, [{"wanda": {"sparsity": 0.5}}], calibration(), progress=False)
    assert created and not any(created)
    assert all(layer.loss is None for layer in report.layers)
    norms = torch.cat(inputs).reshape(-1, dense.shape[1]).norm(dim=0)
    assert torch.equal(q_proj.weight != 0, wanda_mask(dense, norms, 0.5).mask)

    created.clear()
    report = compress_model(tiny("llama"), [{"wanda": {"sparsity": 0.5}}, {"gptq": {"bits": 4}}], calibration(), progress=False)
    assert created and all(created)
    assert all(layer.loss is not None for layer in report.layers)


def test_statistics_pass_skips_the_rest_of_the_block_after_the_last_hooked_layer():
    """After the first chunk, a statistics pass stops once down_proj has its input: down_proj itself
    runs once (chunk 0, to learn the call order), yet its Hessian covers every chunk."""
    model = tiny("llama")
    engine = Engine(model, "sparsegpt-50", device="cpu", chunk_size=2, progress=False)
    from secateurs.pipeline.capture import capture_block_inputs

    ids = calibration(samples=6)
    inputs = capture_block_inputs(model, engine.blocks, ids, 2)
    down = engine.blocks[0].mlp.down_proj
    seen = []
    handle = down.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    stats = engine._gather(engine.blocks[0], engine._block_layers(0), inputs, 0)
    handle.remove()
    assert len(seen) == 1
    accumulator = stats.accumulators[stats.owner["mlp.down_proj"]]
    assert accumulator.count == ids.numel()
    reference = HessianAccumulator(down.in_features, torch.float64)
    handle = down.register_forward_hook(lambda module, args, output: reference.add(args[0]))
    with torch.no_grad():
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs[0]):
            engine.blocks[0](hidden, **kwargs)
    handle.remove()
    torch.testing.assert_close(accumulator.hessian().double(), reference.hessian(), rtol=1e-4, atol=1e-6)


def test_deterministic():
    first, second = tiny("llama"), tiny("llama")
    compress_model(first, "sparsegpt-50-w4", calibration(), progress=False)
    compress_model(second, "sparsegpt-50-w4", calibration(), progress=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_quantized_layers_lie_on_their_grid():
    model = tiny("llama")
    report = compress_model(model, [{"gptq": {"bits": 3, "group_size": 32}}], calibration(), progress=False)
    for name, module in targeted(model).items():
        scale, zero = report.grids[name]
        weight = get_weight(module)
        codes = torch.round(weight / scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1))
        assert codes.min() >= 0 and codes.max() <= 7
        assert torch.allclose(scale.repeat_interleave(32, 1) * (codes - zero.repeat_interleave(32, 1)), weight, atol=1e-6)


def test_mask_then_gptq_keeps_the_mask():
    model = tiny("llama")
    compress_model(model, [{"wanda": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 32}}], calibration(), progress=False)
    for name, module in targeted(model).items():
        assert (get_weight(module) == 0).float().mean() >= 0.5, name


def test_ignore_and_targets():
    model = tiny("llama")
    report = compress_model(model, [{"sparsegpt": {"sparsity": 0.5, "targets": ["mlp"], "ignore": ["down_proj"]}}],
                      calibration(), progress=False)
    assert {layer.name.split(".")[-1] for layer in report.layers} == {"gate_proj", "up_proj"}
    assert (model.model.layers[0].mlp.down_proj.weight != 0).all()


@pytest.mark.parametrize("recipe, message", [
    ([{"sparsegpt": {"sparsity": 1.3}}], "sparsegpt.sparsity"),
    ([{"gptq": {"bits": 9}}], "bits"),
    ([{"sparsegpt": {"mask": "3:2"}}], "sparsegpt.mask"),
    ([{"sparsegpt": {"sparsity": 0.5, "bogus": 1}}], "bogus"),
    ([{"gptq": {"bits": 4, "group_size": 48}}], "does not divide the 64 input columns of layer model.layers.0"),
    ([{"sparsegpt": {"mask": "3:5"}}], "not divisible by 5"),
    ([{"sparsegpt": {"sparsity": 0.5, "targets": ["nothing_like_this"]}}], "match no layer"),
    ([{"sparsegpt": {"mask": "2:4"}}, {"gptq": {"bits": 4, "act_order": True}}], "gptq.act_order"),
    ([{"gptq": {"bits": 4, "act_order": "yes"}}], "gptq.act_order must be true or false"),
])
def test_bad_recipes_are_rejected_before_work(recipe, message):
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SecateursError, match=message):
        compress_model(model, recipe, calibration(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("stages, expected", [
    ([{"gptq": {"bits": 4}}], True),  # llmcompressor's "static" default
    ([{"gptq": {"bits": 4, "act_order": False}}], False),
    ([{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4}}], True),
    ([{"wanda": {"mask": "2:4"}}, {"gptq": {"bits": 4}}], True),  # a fixed mask may be swept in any order
    ([{"sparsegpt": {"mask": "2:4"}}, {"gptq": {"bits": 4}}], False),  # groups of m stay together
])
def test_act_order_default(stages, expected):
    recipe = load_recipe(stages)
    assert next(s for s in recipe.stages if s.method == "gptq").quant_spec().act_order is expected
    assert recipe.as_dict()["stages"][-1]["gptq"]["act_order"] is expected


def test_owl_profile_keeps_the_mean_sparsity():
    model = tiny("llama")
    report = compress_model(model, "sparsegpt-50-owl", calibration(), progress=False)
    assert report.as_dict()["totals"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_matches_cpu():
    """Only the block being compressed moves to the GPU; the result matches the CPU run."""
    on_cpu, on_gpu = tiny("llama"), tiny("llama")
    compress_model(on_cpu, "sparsegpt-50", calibration(), device="cpu", progress=False, hessian_dtype=torch.float64)
    compress_model(on_gpu, "sparsegpt-50", calibration(), device="cuda", progress=False, hessian_dtype=torch.float64)
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    for (name, a), b in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name


def _count_block_forwards(model) -> list[int]:
    _, blocks = find_blocks(model)
    calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.__setitem__(index, calls[index] + 1))
    return calls


def test_weight_only_methods_run_no_forward():
    """Magnitude and RTN need no calibration statistics: no block runs, results equal the algorithms'."""
    model, reference = tiny("llama"), tiny("llama")
    calls = _count_block_forwards(model)
    recipe = [{"magnitude": {"sparsity": 0.5}}, {"rtn": {"bits": 4, "group_size": 32}}]
    report = compress_model(model, recipe, calibration(), progress=False)
    assert calls == [0, 0] and report.calibration["calibrated_blocks"] == 0
    assert all(layer.loss is None for layer in report.layers) and report.as_dict()["totals"]["loss"] is None
    from secateurs.algorithms import QuantSpec, magnitude_mask, round_to_nearest

    for name, module in targeted(reference).items():
        weight = get_weight(module)
        pruned = torch.where(magnitude_mask(weight, 0.5), weight, 0.0)
        expected = round_to_nearest(pruned, QuantSpec(bits=4, group_size=32)).weight
        assert torch.equal(get_weight(targeted(model)[name]), expected), name
        assert (expected == 0).sum() >= weight.numel() // 2


def test_forwards_stop_after_the_last_block_that_uses_calibration():
    """Only block 0 uses calibration: it runs its statistics pass, and nothing needs its outputs."""
    model = tiny("llama")
    calls = _count_block_forwards(model)
    recipe = [{"sparsegpt": {"sparsity": 0.5, "targets": [r"layers\.0\."]}},
              {"rtn": {"bits": 4, "targets": [r"layers\.1\."]}}]
    report = compress_model(model, recipe, calibration(), chunk_size=3, progress=False)
    assert calls == [2, 0]  # two chunks through block 0 once (statistics), no advance
    losses = {layer.name.split(".")[2]: layer.loss for layer in report.layers}
    assert losses["0"] is not None and losses["1"] is None


@pytest.mark.parametrize("stages", [
    [{"sparsegpt": {"sparsity": 0.5}}],
    [{"sparsegpt": {"mask": "2:4"}}],
    [{"gptq": {"bits": 3, "group_size": 16}}],
    [{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4}}],
    [{"wanda": {"sparsity": 0.5}}, {"gptq": {"bits": 4}}],
    [{"sparsegpt": {"sparsity": 0.5}}, {"rtn": {"bits": 4}}],
])
def test_layer_loss_is_the_undamped_quadratic_form(stages):
    """compress_layer takes the loss from the sweep where it can (minus the damping's share); it must
    equal ½ΣΔwᵀHΔw with the undamped H, also with dead inputs (zero rows and columns of H)."""
    from secateurs.pipeline.layer import compress_layer

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(300, 48, generator=generator) @ torch.randn(48, 48, generator=generator)
    x[:, [5, 17]] = 0  # dead inputs
    hessian = 2 * x.T @ x / x.shape[0]
    weight = torch.randn(24, 48, generator=generator)
    prune, quant = (next((s for s in load_recipe({"stages": stages}).stages if s.prunes == p), None) for p in (True, False))
    result = compress_layer(weight, hessian, x.norm(dim=0), prune, quant)
    delta = (weight - result.weight).double()
    expected = 0.5 * float(((delta @ hessian.double()) * delta).sum())
    assert result.loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_native_causal_attention_matches_the_models_own(arch, monkeypatch):
    """Inside the engine's attention context the logits equal the model's own within float32
    rounding; calls with a padding mask go to transformers' SDPA unchanged (bit-identical)."""
    from transformers import AttentionInterface

    from secateurs.pipeline.attention import native_causal_attention
    from secateurs.runtime import kernels

    calls = []
    kernel = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *args, **kw: calls.append(args[0].shape) or kernel(*args, **kw))
    model, ids = tiny(arch), calibration(3)
    padding = torch.ones_like(ids)
    padding[0, -5:] = 0
    sdpa = AttentionInterface._global_mapping["sdpa"]
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        expected_padded = model(ids, attention_mask=padding, use_cache=False).logits
        with native_causal_attention():
            logits = model(ids, use_cache=False).logits
            plain_calls = len(calls)
            padded = model(ids, attention_mask=padding, use_cache=False).logits
    assert AttentionInterface._global_mapping["sdpa"] is sdpa
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(padded, expected_padded) and len(calls) == plain_calls
    if arch in ("llama", "mistral", "qwen2"):  # every layer plain causal: all through the kernel
        assert plain_calls == 2


def test_native_causal_attention_is_undone_after_an_error():
    from transformers import AttentionInterface

    from secateurs.pipeline.attention import native_causal_attention

    sdpa = AttentionInterface._global_mapping["sdpa"]
    with pytest.raises(RuntimeError, match="inside"), native_causal_attention():
        assert AttentionInterface._global_mapping["sdpa"] is not sdpa
        raise RuntimeError("inside")
    assert AttentionInterface._global_mapping["sdpa"] is sdpa


def test_mask_rows_share_masks_in_every_layer():
    model = tiny("llama")
    compress_model(model, [{"sparsegpt": {"sparsity": 0.7, "mask_rows": 4}}], calibration(), progress=False)
    for name, module in targeted(model).items():
        keep = get_weight(module) != 0
        groups = keep.reshape(-1, 4, keep.shape[1])
        assert (groups == groups[:, :1]).all(), name
        assert (~keep).sum().item() == 4 * round(0.7 * keep.numel() / 4), name


def test_mask_rows_must_divide_every_targeted_layer():
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=36, intermediate_size=72, num_hidden_layers=1,
                            num_attention_heads=3, num_key_value_heads=1)  # q_proj: 36 rows
    model = tf.LlamaForCausalLM(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SecateursError, match="mask_rows 8: layer model.layers.0.self_attn.q_proj has 36 output rows, not divisible by 8"):
        compress_model(model, [{"sparsegpt": {"sparsity": 0.5, "mask_rows": 8}}], calibration(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
