"""Tiny models compressed into every format, for the formats tests (a unique module name)."""

from __future__ import annotations


import torch
import transformers as tf

from secateurs.algorithms import QuantSpec, magnitude_mask, round_to_nearest
from secateurs.structure import find_blocks, get_weight, linear_layers, set_weight
from secateurs.formats import StoragePlan
from secateurs.runtime.layouts import vq_to_dense
from secateurs.sources import unique_state

VOCAB = 64


def tiny(arch: str = "llama", dtype=torch.float32, seed: int = 0, intermediate: int = 100):
    """Odd shapes on purpose: 100 input columns leave bitmask padding bits and partial int32 words."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=32, vocab_size=VOCAB))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=48, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=32, tie_word_embeddings=True))
    return model.to(dtype).eval()


def layers(model) -> dict[str, torch.nn.Module]:
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{name}": module for i, block in enumerate(blocks) for name, module in linear_layers(block).items()}


def group_size(cols: int, wanted: int | None) -> int | None:
    return None if wanted is None else next(g for g in (wanted, 20, 4) if cols % g == 0)


# kind -> (sparsity, N:M, bits, symmetric, group size); every format of the registry is reached.
KINDS = {
    "bitmask": (0.5, None, None, True, None),
    "bitmask70": (0.7, None, None, True, None),
    "nm": (None, (2, 4), None, True, None),
    "nm48": (None, (4, 8), None, True, None),
    "int8": (None, None, 8, True, None),
    "int8-asym-g": (None, None, 8, False, 16),
    "int4-g": (None, None, 4, True, 16),
    "int3-asym-g": (None, None, 3, False, 16),
    "int2": (None, None, 2, True, None),
    "int6-asym": (None, None, 6, False, None),
    "sparse-int8": (0.5, None, 8, True, None),
    "sparse-int4-g": (0.7, None, 4, True, 16),
    "vq": None,  # two codebooks of 16 float16 codewords of 4 values, float16 row scales (vq_layer)
    "vqpacked": None,  # two codebooks of 8 words, their 3-bit codes bit-packed (StoragePlan.pack_vq_codes)
    "vqpacked12": None,  # two codebooks of 4096 words: 12-bit codes straddling bytes, bit-packed
}
EXPECTED_FORMAT = {
    "bitmask": "bitmask", "bitmask70": "bitmask", "nm": "nm", "nm48": "nm", "int8": "int8", "int8-asym-g": "int8",
    "int4-g": "pack-quantized", "int3-asym-g": "pack-quantized", "int2": "pack-quantized",
    "int6-asym": "pack-quantized", "sparse-int8": "bitmask-int8", "sparse-int4-g": "bitmask-packed", "vq": "vq",
    "vqpacked": "vq-packed", "vqpacked12": "vq-packed",
}


# One layer of each format (every layer with a bitmask has 100 columns: padding bits).
# With codes packed, only 8-bit codebooks stay in aqlm's byte layout (vq).
MIXED = {"q_proj": "int3-asym-g", "k_proj": "nm", "v_proj": "int8-asym-g", "layers.0.self_attn.o_proj": "int4-g",
         "layers.1.self_attn.o_proj": "vqpacked", "gate_proj": "sparse-int8", "up_proj": "sparse-int4-g",
         "layers.0.mlp.down_proj": "bitmask70", "layers.1.mlp.down_proj": "vq-8-4"}


def compress(model, kinds: str | dict[str, str]):
    """Prune and quantize the block linear layers in place with the weights the engine writes
    (pruned exactly 0, quantized exactly on the grid): `kinds` is one kind for every layer, or
    {layer name suffix: kind}. Returns what save_compressed takes: a StoragePlan naming the N:M
    layers with the quantization grids, or the grids alone."""
    grids, nm_layers, codes = {}, {}, {}
    for name, module in layers(model).items():
        kind = kinds if isinstance(kinds, str) else next((k for end, k in kinds.items() if name.endswith(end)), None)
        if kind is None:
            continue
        if kind.startswith("vq"):  # "vq", "vqpacked", "vqpacked12" or "vq-<bits>-<group>"
            bits, group = (int(part) for part in kind.split("-")[1:]) if "-" in kind else (
                {"vqpacked": (3, 4), "vqpacked12": (12, 4)}.get(kind, (4, 4)))
            codes[name], weight = vq_layer(*get_weight(module).shape, seed=len(codes), bits=bits, group=group)
            set_weight(module, weight.to(get_weight(module).dtype))
            continue
        sparsity, nm, bits, symmetric, wanted_group = KINDS[kind]
        weight = get_weight(module).float()
        if nm and weight.shape[1] % nm[1]:
            continue  # 4:8 does not fit 100 columns: left dense
        if sparsity or nm:
            n, m = nm or (0, 0)
            weight = weight * magnitude_mask(weight, sparsity or 0.0, n=n, m=m)
        if nm:
            nm_layers[name] = nm
        if bits:
            spec = QuantSpec(bits, symmetric, group_size(weight.shape[1], wanted_group))
            result = round_to_nearest(weight, spec)
            weight = torch.where(weight == 0, 0.0, result.weight)  # pruned stay pruned
            grids[name] = (result.scale, result.zero)
        set_weight(module, weight)
    if not nm_layers and not codes:
        return grids
    packed = any(kind.startswith("vqpacked") for kind in ([kinds] if isinstance(kinds, str) else kinds.values()))
    return StoragePlan(grids, nm_layers, vq=codes, pack_vq_codes=packed)


def vq_layer(rows: int, cols: int, seed: int = 0, bits: int = 4, group: int = 4):
    """Random (codes, float16 codebooks, float16 scales) of two codebooks of 2**bits words of
    `group` values, and the float32 weight they code."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols // group, 2), generator=generator, dtype=torch.int32)
    codebooks = (torch.randn(2, 2**bits, group, generator=generator) * 0.1).half()
    scales = (torch.rand(rows, generator=generator) + 0.5).half()
    return (codes, codebooks, scales), vq_to_dense(codes, codebooks, scales)


def dense_weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in unique_state(model).items()}
