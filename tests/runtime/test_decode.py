"""The C++ decode path (secateurs.runtime.decode) against transformers' own forward and generate,
on tiny random Llama and Gemma 3 models built here, with dense and compressed linear layers."""

import ctypes
import json
import math

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import assert_matches_reference, forced_path, stored_weight
from secateurs.cli import main
from secateurs.runtime import BitmaskLinear, NMLinear, QuantLinear, SparseInt4Linear, SparseQuantLinear, VQLinear, kernels
from secateurs.runtime import layouts
from secateurs.runtime.decode import PREFILL_CHUNK, DecodeError, DecodeModel, DecodeUnsupported

VOCAB = 97


def llama(seed: int = 0, bias: bool = False, tied: bool = True, hidden: int = 48, intermediate: int = 80,
          layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=160,
                         tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias, initializer_range=0.15,
                         rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    return _randomize_norms(LlamaForCausalLM(config).eval())


def gemma(seed: int = 0, sliding_window: int = 5, softcap: bool = True, intermediate: int = 64) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=intermediate, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=160, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        query_pre_attn_scalar=24, initializer_range=0.15, attn_logit_softcapping=20.0 if softcap else None,
        final_logit_softcapping=15.0 if softcap else None,
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    # Eager attention: the reference applies the attention-logit softcap (SDPA would not).
    config._attn_implementation = "eager"
    model = _randomize_norms(Gemma3ForCausalLM(config).eval())
    with torch.no_grad():  # scaled by sqrt(hidden), the embedding would drown the blocks: greedy repeats
        model.model.embed_tokens.weight.mul_(0.3)
    return model


def _randomize_norms(model):
    """Norm weights are ones (Llama) or zeros (Gemma) at init: random ones test their use."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


MODELS = {"llama": llama, "gemma": gemma}


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


def hf_greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """transformers' greedy generate without an eos (whose id the random models may well pick)."""
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        with torch.no_grad():
            out = model.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        model.generation_config.eos_token_id = eos
    assert out.shape[1] == len(ids) + new_tokens
    return out[0, len(ids):].tolist()


# Int8-weight layers at batch 1 (a decode step, the LM head) compute on activations rounded to
# int16 per 64 columns (runtime/csrc/kernels.h), about 1e-5 of a layer's output: against a
# forward on fp32 activations the layers compound that to ~1e-4 of the largest logit.
INT16_ACTIVATIONS_TOLERANCE = 5e-4


def assert_logits_close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 2e-5) -> None:
    """fp32 with a different summation order: errors of a few ulps of the largest logit."""
    scale = max(1.0, reference.abs().max().item())
    error = (ours - reference).abs().max().item()
    assert error <= tolerance * scale, f"max logit error {error:.3g} (largest logit {scale:.3g})"


# --- exactness against transformers ------------------------------------------------------------

@pytest.mark.parametrize("arch", MODELS)
def test_prefill_and_steps_match_hf_forward(arch):
    model = MODELS[arch]()
    ids = prompt(14)
    reference = hf_logits(model, ids)
    decoder = DecodeModel.from_model(model, max_length=32)
    assert_logits_close(decoder.forward(ids), reference[-1])
    for position in range(len(ids)):  # one token at a time over the cache the prefill wrote
        assert_logits_close(decoder.forward(ids[position: position + 1], position), reference[position])
    # A prefill in two parts continues from the cache of the first.
    decoder.forward(ids[:5])
    assert_logits_close(decoder.forward(ids[5:], 5), reference[-1])


def test_sliding_window_is_shorter_than_the_sequence_and_matters():
    model = gemma(sliding_window=4, intermediate=68)  # 68: the vectorized GELU's scalar tail runs too
    ids = prompt(20, seed=3)
    decoder = DecodeModel.from_model(model, max_length=24)
    assert_logits_close(decoder.forward(ids), hf_logits(model, ids)[-1])
    wide = gemma(sliding_window=64, intermediate=68)  # same weights (same seed), every layer sees everything
    assert (hf_logits(wide, ids)[-1] - hf_logits(model, ids)[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", MODELS)
def test_prefill_longer_than_one_chunk(arch):
    model = MODELS[arch]()
    ids = prompt(PREFILL_CHUNK + 9, seed=4)
    decoder = DecodeModel.from_model(model, max_length=PREFILL_CHUNK + 12)
    assert_logits_close(decoder.forward(ids), hf_logits(model, ids)[-1])


@pytest.mark.parametrize("arch", MODELS)
def test_greedy_tokens_equal_hf_generate(arch):
    model = MODELS[arch]()
    ids = prompt(9, seed=5)
    expected = hf_greedy(model, ids, 20)
    assert len(set(expected)) > 4, "degenerate reference: the test would prove little"
    decoder = DecodeModel.from_model(model, max_length=40)
    streamed = []
    assert decoder.generate(ids, 20, on_token=streamed.append, eos=None) == expected
    assert streamed == expected
    stats = decoder.stats
    assert (stats.prompt_tokens, stats.generated_tokens, stats.decode_steps) == (9, 20, 19)
    assert stats.decode_tokens_per_second > 0 and stats.prefill_tokens_per_second > 0
    assert stats.kernel_ms_per_token > 0 and stats.other_ms_per_token > 0 and stats.python_ms_per_token >= 0


def test_generation_stops_at_eos():
    model = llama()
    ids = prompt(6, seed=6)
    decoder = DecodeModel.from_model(model, max_length=40)
    full = decoder.generate(ids, 20, eos=None)
    eos = full[4]
    stopped = decoder.generate(ids, 20, eos={eos, VOCAB + 5})
    assert stopped == full[: full.index(eos) + 1]
    assert decoder.generate(ids, 3, eos=eos) == full[: min(3, full.index(eos) + 1)]
    model.generation_config.eos_token_id = [VOCAB + 7, eos]  # the default: the model's eos ids
    assert DecodeModel.from_model(model, max_length=40).generate(ids, 20) == stopped


def test_bias_and_untied_head():
    model = llama(bias=True, tied=False, intermediate=84)  # 84: the vectorized SiLU's scalar tail runs too
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    ids = prompt(11, seed=7)
    decoder = DecodeModel.from_model(model, max_length=16)
    assert_logits_close(decoder.forward(ids), hf_logits(model, ids)[-1])


def test_bf16_model_weights_are_read_as_bf16():
    model = llama()
    reference = llama().to(torch.bfloat16).to(torch.float32)  # the same weights rounded, computed in fp32
    model.to(torch.bfloat16)
    ids = prompt(10, seed=8)
    decoder = DecodeModel.from_model(model, max_length=16)
    assert_logits_close(decoder.forward(ids), hf_logits(reference, ids)[-1], tolerance=5e-5)


# --- compressed linear layers ------------------------------------------------------------------

def _pruned(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    threshold = weight.abs().flatten().kthvalue(max(1, int(sparsity * weight.numel()))).values
    return weight * (weight.abs() > threshold)


def _pruned_rows(weight: torch.Tensor, sparsity: float, group: int = 4) -> torch.Tensor:
    """Pruned with one mask per group of `group` rows (a column's summed |w| decides)."""
    rows, cols = weight.shape
    scores = weight.abs().reshape(rows // group, group, cols).sum(1)
    threshold = scores.flatten().kthvalue(max(1, int(sparsity * scores.numel()))).values
    return weight * (scores > threshold).repeat_interleave(group, 0)


def _two_of_four(weight: torch.Tensor) -> torch.Tensor:
    groups = weight.view(weight.shape[0], -1, 4)
    keep = groups.abs().argsort(-1).argsort(-1) >= 2
    return (groups * keep).view_as(weight)


def _vector_quantized(weight: torch.Tensor, bias, books: int = 2, words: int = 256, half: bool = False) -> VQLinear:
    """Random codes into codebooks of the weight's spread (groups of 8 inputs where they fit, else 4);
    `half`: codebooks rounded to float16, as the vq files hold them (the kernels then read halves)."""
    rows, cols = weight.shape
    group = 8 if cols % 8 == 0 else 4
    generator = torch.Generator().manual_seed(rows * 1000 + cols)
    codes = torch.randint(0, words, (rows, cols // group, books), generator=generator)
    codebooks = torch.randn(books, words, group, generator=generator) * float(weight.std()) / books**0.5
    codebooks = codebooks.to(torch.float16).float() if half else codebooks
    module = VQLinear(codes, codebooks, torch.rand(rows, generator=generator) + 0.5, bias)
    assert (module.codebooks_half is not None) == half
    return module


def _integer(module: VQLinear) -> VQLinear:
    """On int8 codebooks and int8 activations (where groups of 8 allow: else it stays float)."""
    module.use_integer_codebooks()
    return module


def _sparse_int4(weight: torch.Tensor, bias) -> torch.nn.Module:
    """70% pruned, 4-bit codes per group of 64 (per row where the width is not a multiple of 64)."""
    rows, cols = weight.shape
    if cols % 64:
        return QuantLinear.from_dense(weight, bias, format="int4")
    keep = _pruned(weight, 0.7) != 0
    codes, scale, zero = layouts.quantize_rtn(weight, 4, 64)
    return SparseInt4Linear.from_codes(codes, keep, scale, zero, 64, bias)


COMPRESSORS = {
    "bitmask": lambda w, b: BitmaskLinear.from_dense(_pruned(w, 0.7), b),
    "bitmask-bf16": lambda w, b: BitmaskLinear.from_dense(_pruned(w, 0.5), b, format="bf16"),
    "sparse-int8": lambda w, b: SparseQuantLinear.from_dense(_pruned(w, 0.6), b),
    "sparse-int8-rows4": lambda w, b: SparseQuantLinear.from_dense(_pruned_rows(w, 0.6), b),
    "nm": lambda w, b: NMLinear.from_dense(_two_of_four(w), b),
    "int8": lambda w, b: QuantLinear.from_dense(w, b, format="int8"),
    "int4-g16": lambda w, b: QuantLinear.from_dense(w, b, format="int4", group_size=16),
    "vq": _vector_quantized,
    "vq-half": lambda w, b: _vector_quantized(w, b, half=True),
    "vq-int8": lambda w, b: _integer(_vector_quantized(w, b, half=True)),
}
EXTRA_COMPRESSORS = {
    "vq-3x1024": lambda w, b: _vector_quantized(w, b, books=3, words=1024),  # 16-bit codes
    "sparse-int4": lambda w, b: _sparse_int4(w, b),
    "int4": lambda w, b: QuantLinear.from_dense(w, b, format="int4"),
    "int4-g12": lambda w, b: QuantLinear.from_dense(w, b, format="int4", group_size=12),
}
KINDS = [*COMPRESSORS, "mixed"]


def compress(model, kinds) -> None:
    """Replace the block linears (in place) with compressed modules; kinds: one kind or a cycle
    (where "dense" leaves the layer as it is)."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, module in list(parent.named_children()):
                if isinstance(module, nn.Linear) and kinds[count % len(kinds)] == "dense":
                    count += 1
                elif isinstance(module, nn.Linear):
                    kind = kinds[count % len(kinds)]
                    replacement = (COMPRESSORS | EXTRA_COMPRESSORS)[kind](module.weight.detach(), module.bias)
                    setattr(parent, name, replacement)
                    count += 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", MODELS)
def test_compressed_layers_match_hf_with_the_same_modules(arch, kind):
    model = MODELS[arch](seed=2)
    if arch == "llama" and kind == "bitmask":
        model = llama(seed=2, bias=True)  # compressed modules with a bias
    compress(model, [*COMPRESSORS, "dense"] if kind == "mixed" else kind)
    ids = prompt(12, seed=9)
    reference = hf_logits(model, ids)
    decoder = DecodeModel.from_model(model, max_length=40)
    assert_logits_close(decoder.forward(ids), reference[-1])
    step_tolerance = INT16_ACTIVATIONS_TOLERANCE if kind in ("int8", "sparse-int8", "sparse-int8-rows4", "mixed") else 2e-5
    assert_logits_close(decoder.forward(ids[-1:], len(ids) - 1), reference[-1], step_tolerance)
    assert decoder.generate(ids, 16, eos=None) == hf_greedy(model, ids, 16)


def test_int4_with_columns_not_a_multiple_of_the_deinterleave_block():
    """int4 activations are deinterleaved in blocks of 2W columns: 84 leaves a partial block."""
    model = llama(seed=3, intermediate=84)
    compress(model, ["int4", "int4-g12"])
    ids = prompt(10, seed=14)
    decoder = DecodeModel.from_model(model, max_length=16)
    assert_logits_close(decoder.forward(ids), hf_logits(model, ids)[-1])


def test_compressed_lm_head():
    model = llama(tied=False)
    head = model.lm_head.weight.detach()
    model.lm_head = QuantLinear.from_dense(head, format="int8")
    ids = prompt(8, seed=10)
    decoder = DecodeModel.from_model(model, max_length=16)
    assert_logits_close(decoder.forward(ids), hf_logits(model, ids)[-1], INT16_ACTIVATIONS_TOLERANCE)


# --- embeddings stored as bf16 / int8 ----------------------------------------------------------

def _int8_rows(weight: torch.Tensor) -> torch.Tensor:
    max_abs = weight.abs().amax(1)
    scale = torch.where(max_abs > 0, max_abs / 127, 1.0)  # Gemma's padding row is zeros
    return torch.round(weight / scale[:, None]).clamp(-127, 127) * scale[:, None]


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("embeddings", ["bf16", "int8"])
def test_embeddings_formats(arch, embeddings):
    """Exactly the model whose (tied) embedding matrix is rounded the same way, and close to the
    unrounded model."""
    model = MODELS[arch]()
    ids = prompt(10, seed=11)
    original = hf_logits(model, ids)[-1]
    decoder = DecodeModel.from_model(model, embeddings=embeddings, max_length=16)
    ours = decoder.forward(ids)
    with torch.no_grad():
        weight = model.model.embed_tokens.weight
        weight.copy_(weight.to(torch.bfloat16).float() if embeddings == "bf16" else _int8_rows(weight))
    assert_logits_close(ours, hf_logits(model, ids)[-1], INT16_ACTIVATIONS_TOLERANCE if embeddings == "int8" else 2e-5)
    assert (ours - original).abs().max() < 0.05 * original.abs().max()
    assert decoder.embeddings == embeddings


# --- kernel paths and threads ------------------------------------------------------------------

@pytest.mark.parametrize("path", ("avx512vbmi2", "avx512", "avx2", "portable"))
def test_forced_kernel_paths_agree(path):
    if path not in kernels.supported_paths():
        pytest.skip(f"{path} kernels cannot run here")
    model = gemma(seed=3)
    compress(model, ["bitmask", "nm", "int4-g16", "sparse-int8", "int8", "bitmask-bf16", "vq", "vq-3x1024", "sparse-int4",
                     "sparse-int8-rows4", "vq-half", "vq-int8"])
    ids = prompt(13, seed=12)
    reference = hf_logits(model, ids)[-1]
    with forced_path(path):
        decoder = DecodeModel.from_model(model, embeddings="fp32", max_length=20)
    assert decoder.kernel_path == path
    # int8 activations of the vq-int8 layers: an activation a few ulps off a rounding boundary may
    # round the other way in one of the two computations
    assert_logits_close(decoder.forward(ids), reference, INT16_ACTIVATIONS_TOLERANCE)


def test_torch_kernel_path_is_unsupported():
    with forced_path("torch"), pytest.raises(DecodeUnsupported, match="native kernels"):
        DecodeModel.from_model(llama())


def test_two_threads_agree_with_one(two_threads):
    """Layers large enough to be split between threads, and a prefill long enough for the
    attention to run its heads in parallel."""
    model = llama(hidden=192, intermediate=768, layers=1)
    compress(model, ["bitmask", "dense", "int4-g16", "nm", "vq"])
    ids = prompt(70, seed=13)
    reference = hf_logits(model, ids)[-1]
    decoder = DecodeModel.from_model(model, max_length=80, threads=2)
    assert_logits_close(decoder.forward(ids), reference)
    decoder.set_threads(1)
    assert_logits_close(decoder.forward(ids), reference)


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_two_threads_split_grouped_layers(two_threads, kind):
    """q, k, v (and gate, up) of one layout run in one parallel region, their rows laid end to end and
    split between the threads by cost: every row of every layer computed once, at batch 1 (one step)
    and in a prefill."""
    model = llama(hidden=576, intermediate=1024, layers=1, seed=4)
    compress(model, kind)
    ids = prompt(24, seed=14)
    reference = hf_logits(model, ids)
    decoder = DecodeModel.from_model(model, max_length=32, threads=2)
    assert_logits_close(decoder.forward(ids[:-1]), reference[-2])
    tolerance = INT16_ACTIVATIONS_TOLERANCE if "int8" in kind else 2e-5
    two = decoder.forward(ids[-1:], len(ids) - 1)
    assert_logits_close(two, reference[-1], tolerance)
    decoder.set_threads(1)
    assert_logits_close(decoder.forward(ids[-1:], len(ids) - 1), two, tolerance)


@pytest.mark.parametrize("value_dtype", (torch.float32, torch.bfloat16, torch.int8))
@pytest.mark.parametrize("batch", (1, 3, 9))
def test_dense_kernel_matches_reference(kernel_path, value_dtype, batch):
    generator = torch.Generator().manual_seed(batch)
    for rows, cols in ((1, 1), (7, 13), (33, 64), (19, 257), (5, 1031)):
        weight, dense, row_scale = stored_weight(torch.randn(rows, cols, generator=generator), value_dtype, generator)
        x = torch.randn(batch, cols, generator=generator)
        y = kernels.dense_mm(x, weight, row_scale)
        assert kernels.last_kernel_path() == kernel_path
        assert_matches_reference(y, x, dense, int8=value_dtype == torch.int8)


# --- bad input ---------------------------------------------------------------------------------

def test_bad_inputs_are_clear_errors():
    decoder = DecodeModel.from_model(llama(), max_length=16)
    for tokens, match in (([VOCAB], "not an integer in"), ([-1], "not an integer in"), ([], "no token ids"),
                          (torch.tensor([1.0, 2.0]), "integer tensor"), ([1, 2.5], "not an integer"),
                          (torch.zeros(2, 3, dtype=torch.long), "1-D"), (list(range(17)), "exceed max_length")):
        with pytest.raises(DecodeError, match=match):
            decoder.forward(tokens)
    with pytest.raises(DecodeError, match="exceed max_length"):
        decoder.forward([1, 2], start=15)
    with pytest.raises(DecodeError, match="start position"):
        decoder.forward([1], start=-1)
    with pytest.raises(DecodeError, match="exceed max_length"):
        decoder.generate([1] * 10, 8)
    with pytest.raises(DecodeError, match="max_new_tokens"):
        decoder.generate([1], 0)
    with pytest.raises(DecodeError, match="threads"):
        decoder.set_threads(0)
    with pytest.raises(DecodeError, match="embeddings"):
        DecodeModel.from_model(llama(), embeddings="fp16")
    with pytest.raises(DecodeError, match="max_length"):
        DecodeModel.from_model(llama(), max_length=161)
    with pytest.raises(TypeError):
        DecodeModel()
    assert decoder.generate([1] * 9, 8)  # exactly fits: the last new token needs no position


def test_native_forward_rejects_bad_arguments_without_crashing():
    """The C++ entry point checks what Python already checked: a status, never a crash."""
    decoder = DecodeModel.from_model(llama(), max_length=8)
    forward = decoder._library.secateurs_decode_forward
    tokens = (ctypes.c_int64 * 4)(1, 2, VOCAB, 3)
    assert forward(decoder._plan, tokens, 2, 0, None, None) == 0
    assert forward(decoder._plan, tokens, 3, 0, None, None) == 2  # token id out of range
    assert forward(decoder._plan, tokens, 0, 0, None, None) == 2
    assert forward(decoder._plan, tokens, 2, 7, None, None) == 2  # past max_length
    assert forward(decoder._plan, tokens, 1, -1, None, None) == 2
    assert forward(decoder._plan, None, 1, 0, None, None) == 2
    assert forward(None, tokens, 1, 0, None, None) == 2


def test_native_plan_rejects_an_inconsistent_description():
    """decode.cpp re-checks the shapes it is given (a description Python would not build)."""
    decoder = DecodeModel.from_model(llama(), max_length=8)
    spec, status, message = decoder._spec, ctypes.c_int(0), ctypes.create_string_buffer(256)
    spec.head_dim += 2
    try:
        plan = decoder._library.secateurs_decode_create(ctypes.byref(spec), kernels.PATH_IDS["portable"], 1, 64,
                                                        ctypes.byref(status), message, len(message))
    finally:
        spec.head_dim -= 2
    assert plan is None and status.value == 2
    assert message.value.decode() == "layer 0 q_proj: unexpected shape"
    spec.n_heads += 1  # no longer a multiple of the key / value heads
    try:
        plan = decoder._library.secateurs_decode_create(ctypes.byref(spec), kernels.PATH_IDS["portable"], 1, 64,
                                                        ctypes.byref(status), message, len(message))
    finally:
        spec.n_heads -= 1
    assert plan is None and message.value.decode() == "model: inconsistent model description"


def test_unsupported_models_and_layers():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=VOCAB)).eval()
    with pytest.raises(DecodeUnsupported, match="Llama and Gemma 3.*GPT2LMHeadModel"):
        DecodeModel.from_model(gpt2)
    model = llama()
    model.model.layers[1].mlp.up_proj = nn.Sequential(model.model.layers[1].mlp.up_proj)
    with pytest.raises(DecodeUnsupported, match=r"model.layers.1.mlp.up_proj: .*Sequential"):
        DecodeModel.from_model(model)
    model = llama()
    model.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}
    model.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(DecodeUnsupported, match="rope type 'dynamic'"):
        DecodeModel.from_model(model)


# --- command line ------------------------------------------------------------------------------

def tiny_tokenizer():
    """Word level: "[UNK]" 0, "<s>" 1 (prepended), "</s>" 2, "w3".."w96" 3..96."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def saved_llama(tmp_path):
    model, tokenizer = llama(seed=4), tiny_tokenizer()
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model, tokenizer


PROMPT = "w5 w17 w42 w8 w23"


def test_cli_generate_streams_the_greedy_text(saved_llama, capsys):
    path, model, tokenizer = saved_llama
    ids = torch.tensor(tokenizer(PROMPT)["input_ids"])
    expected = hf_greedy(model, ids, 12)
    if 2 in expected:  # the tokenizer's eos stops generation there
        expected = expected[: expected.index(2) + 1]
    assert main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "12", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert "decode" in err and "tok/s" in err and "fp32 embeddings" in err
    # bf16 embeddings may change the tokens (rounded weights): the same run, other storage.
    assert main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "12",
                 "--embeddings", "bf16"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == len(expected) and "bf16 embeddings" in err


def _cli_generates_greedy(model, tokenizer, path, new_tokens, capsys) -> str:
    """`secateurs generate` on `path` prints the text of HF's greedy tokens (up to eos); returns stderr."""
    ids = torch.tensor(tokenizer(PROMPT)["input_ids"])
    expected = hf_greedy(model, ids, new_tokens)
    if 2 in expected:
        expected = expected[: expected.index(2) + 1]
    assert main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", str(new_tokens)]) == 0
    out, err = capsys.readouterr()
    assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    return err


def test_cli_generate_on_a_compressed_directory(tmp_path, capsys):
    from secateurs.formats import save_compressed

    model, tokenizer = llama(seed=5), tiny_tokenizer()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        for layer in model.model.layers:
            for module in (*layer.self_attn.children(), *layer.mlp.children()):
                if isinstance(module, nn.Linear):
                    module.weight.copy_(_pruned(module.weight, 0.7))
    save_compressed(model, {}, tmp_path / "sparse", tokenizer)
    err = _cli_generates_greedy(model, tokenizer, tmp_path / "sparse", 10, capsys)
    assert "falling back" not in err


def test_cli_falls_back_to_transformers_for_other_architectures(tmp_path, capsys):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32, vocab_size=VOCAB,
                                      eos_token_id=None, bos_token_id=1)).eval()
    gpt2.generation_config.eos_token_id = None
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "gpt2")
    err = _cli_generates_greedy(gpt2, tokenizer, tmp_path / "gpt2", 6, capsys)
    assert "decode path unavailable" in err and "falling back to transformers generate" in err


def test_cli_errors_are_one_line(saved_llama, capsys):
    path, _, _ = saved_llama
    for arguments, message in ((["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
                               (["--threads", "0"], "--threads must be a positive integer"),
                               (["--max-new-tokens", "400"], "exceed the model's 160 positions"),
                               (["--vq-integer"], "has no vq layer with an integer kernel")):
        assert main(["generate", "--model", str(path), "--prompt", PROMPT, *arguments]) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading progress bar
        assert last.startswith("secateurs: error: ") and message in last


def test_cli_bench_decode(saved_llama, capsys):
    path, _, _ = saved_llama
    assert main(["dev", "bench-decode", "--model", str(path), "--prompt-tokens", "6", "--new-tokens", "5", "--repeat", "2",
                 "--threads", "1", "--embeddings", "int8", "--json"]) == 0
    out = capsys.readouterr().out
    assert "threads 1: decode" in out and "kernel" in out
    report = json.loads(out[out.index("{"):])
    row = report["rows"][0]
    assert report["embeddings"] == "int8" and row["threads"] == 1
    assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("decode_tokens_per_second", "prefill_tokens_per_second"))


@pytest.mark.parametrize("path", ("avx512vbmi2", "avx2"))
def test_sparse_int4_layers_match_hf(path):
    """Every block layer bitmask-sparse 4-bit (64-wide inputs): prefill (row by row) and steps."""
    if path not in kernels.supported_paths():
        pytest.skip(f"{path} kernels cannot run here")
    model = llama(seed=4, hidden=192, intermediate=128)
    compress(model, "sparse-int4")
    layer = model.model.layers[0]
    assert all(isinstance(m, SparseInt4Linear) for m in (layer.self_attn.q_proj, layer.mlp.up_proj, layer.mlp.down_proj))
    ids = prompt(12, seed=5)
    reference = hf_logits(model, ids)
    with forced_path(path):
        decoder = DecodeModel.from_model(model, max_length=40)
        assert_logits_close(decoder.forward(ids), reference[-1], INT16_ACTIVATIONS_TOLERANCE)
        assert_logits_close(decoder.forward(ids[-1:], len(ids) - 1), reference[-1], INT16_ACTIVATIONS_TOLERANCE)
