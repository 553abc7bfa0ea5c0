"""Writing compressed model directories: each linear layer of the decoder blocks in the smallest
exact format of the registry (registry.py), the rest as it is; config.json records every layer's
format under `secateurs_compression`, and compressed-tensors' `quantization_config` where
compressed-tensors can read every layer (else `quant_method: secateurs`, read by hf_loading.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from secateurs.errors import SecateursError
from secateurs.formats.registry import DTYPES, FORMATS, LAYOUT_KEY, LAYOUT_VERSION, LayerSpec, grid_codes, tensor_bytes
from secateurs.io import (CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, atomic_directory, read_header, shard_name, weight_files,
                          write_checksums, write_json)
from secateurs.sources import BlockSource, InMemoryModel
from secateurs.structure import is_transposed, linear_layers


AQLM_METHOD = "aqlm"  # quant_method of directories whose every compressed layer is one vq shape


@dataclass
class StoragePlan:
    """What the stored formats need to know of a compression, as plain data: each quantized layer's
    grid (scale, zero), the layers pruned N:M with their (n, m), the layers whose GPTQ sweep ran
    in activation order (static groups; recorded for compressed-tensors' config), and each vector-
    quantized layer's codes [rows, cols / g, M], float16 codebooks [M, 2**B, g] and scales [rows]."""

    grids: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    nm: dict[str, tuple[int, int]] = field(default_factory=dict)
    act_order: set[str] = field(default_factory=set)
    vq: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # (codes, codebooks, scales)
    # Codes that are not whole bytes (codebooks of 2**B words, B not 8 or 16) bit-packed (vq-packed)
    # instead of a byte or two each (vq, which the aqlm package reads): the smaller file where aqlm
    # compatibility does not matter.
    pack_vq_codes: bool = False

    @classmethod
    def of(cls, plan_or_grids) -> StoragePlan:
        """A StoragePlan, or a plain {layer: (scale, zero)} (None: no grids)."""
        if isinstance(plan_or_grids, StoragePlan):
            return plan_or_grids
        return cls(grids=dict(plan_or_grids or {}))


@dataclass
class SavedModel:
    path: Path
    formats: dict[str, str] = field(default_factory=dict)  # compressed layer -> format name
    bytes_by_format: dict[str, int] = field(default_factory=dict)  # tensor bytes; "dense" for the rest
    file_bytes: int = 0  # model.safetensors, header included
    compressed_tensors_problem: str | None = "nothing written yet"  # why compressed-tensors cannot read it

    @property
    def compressed_tensors(self) -> bool:
        """config.json has a compressed-tensors quantization_config."""
        return self.compressed_tensors_problem is None


def _quant_fields(weight: Tensor, grid: tuple[Tensor, Tensor], layer: str) -> dict:
    """bits (the fewest holding every code and zero point), group_size and symmetry of a grid."""
    scale, zero = grid
    rows, cols = weight.shape
    groups = scale.shape[1] if scale.dim() == 2 else 0
    if scale.shape != (rows, groups) or zero.shape != scale.shape or groups == 0 or cols % groups:
        raise SecateursError(f"layer {layer}: grid of shape {tuple(scale.shape)} does not fit a [{rows}, {cols}] weight")
    if not bool(weight.isfinite().all()) or not bool(((zero >= 0) & (zero <= 255) & (zero == zero.round())).all()):
        raise SecateursError(f"layer {layer}: NaN weights, or zero points that are not integers in [0, 255]")
    group_size = None if groups == 1 else cols // groups
    # Clamped: a bfloat16 weight at the edge of an 8-bit grid can round to just past it; whether the
    # codes are right is checked once the layer is encoded.
    codes = grid_codes(weight, grid, group_size, 8)
    bits = max(2, int(max(codes.max(), zero.max())).bit_length())
    return {"bits": bits, "group_size": group_size, "symmetric": bool((zero == 2 ** (bits - 1)).all())}


def choose_format(layer: str, weight: Tensor, transposed: bool, grid, nm, code=None,
                  pack_vq_codes: bool = False) -> tuple[LayerSpec, dict[str, Tensor]] | None:
    """The smallest exact format for one layer's stored weight [out, in], or None where its dense
    weight is smallest; `code` (codes, codebooks, scales) stores a vector-quantized layer as vq (or
    vq-packed, with `pack_vq_codes`, when its codes are not whole bytes)."""
    if weight.dtype not in DTYPES.values():
        raise SecateursError(f"layer {layer}: dtype {weight.dtype} has no compressed format "
                             f"({', '.join(DTYPES)}); write it with --dtype float32 or bfloat16, or --dense")
    dtype = next(name for name, value in DTYPES.items() if value == weight.dtype)
    base = {"rows": weight.shape[0], "cols": weight.shape[1], "dtype": dtype, "transposed": transposed}
    if code is not None:
        codes, codebooks, _ = code
        bits = (codebooks.shape[1] - 1).bit_length()
        vq = FORMATS["vq-packed" if pack_vq_codes and bits % 8 else "vq"]
        spec = LayerSpec(format=vq.name, **base, bits=bits, group_size=codebooks.shape[2], codebooks=codebooks.shape[0])
        problem = vq.spec_problem(spec)
        if problem or codes.shape != (spec.rows, spec.cols // spec.group_size, spec.codebooks):
            raise SecateursError(f"layer {layer}: its codebooks do not fit its [{spec.rows}, {spec.cols}] weight "
                                 f"({problem or f'codes of shape {tuple(codes.shape)}'})")
        return _exact(layer, weight, (spec, vq.encode_codes(*code, spec)))
    if grid is not None:
        base |= _quant_fields(weight, grid, layer)
        names = ("int8", "bitmask-int8") if base["bits"] == 8 else ("pack-quantized", "bitmask-packed")
    elif nm:
        base |= {"n": nm[0], "m": nm[1]}
        names = ("nm",)
    else:
        names = (None, "bitmask")
    best, best_bytes = None, None
    for name in names:  # ties keep the earlier: dense quantized over sparse, dense float over bitmask
        if name is None:
            candidate, size = None, weight.numel() * weight.element_size()
        else:
            spec = LayerSpec(format=name, **base)
            try:
                tensors = FORMATS[name].encode(weight, spec, grid)
            except ValueError as exc:  # e.g. a group with more than n nonzeros
                raise SecateursError(f"layer {layer}: {exc}") from None
            candidate, size = (spec, tensors), tensor_bytes(tensors)
        if best_bytes is None or size < best_bytes:
            best, best_bytes = candidate, size
    return best if best is None else _exact(layer, weight, best)


def _exact(layer: str, weight: Tensor, chosen: tuple[LayerSpec, dict[str, Tensor]]) -> tuple[LayerSpec, dict[str, Tensor]]:
    spec, tensors = chosen
    if not torch.equal(FORMATS[spec.format].decode(tensors, spec), weight):
        raise SecateursError(f"layer {layer}: the weights are not exactly representable in format {spec.format} "
                             f"(quantized weights off their grid or codebooks, or NaN)")
    return chosen


def check_storable(dtype: torch.dtype) -> None:
    """Refuse, before any work, a dtype the compressed formats cannot hold."""
    if dtype not in DTYPES.values():
        raise SecateursError(f"the compressed formats store {' or '.join(DTYPES)} weights, not {dtype}: "
                             f"pass --dtype float32 or bfloat16, or --dense")


def compressed_tensors_problem(specs: dict[str, LayerSpec]) -> str | None:
    """Why compressed-tensors cannot read these layers (None: it can)."""
    if not specs:
        return "no layer is compressed"
    names = {layer: FORMATS[spec.format].compressed_tensors_names(spec) for layer, spec in specs.items()}
    unreadable = sorted(layer for layer, name in names.items() if name is None)
    if unreadable:
        spec = specs[unreadable[0]]
        shown = f"{spec.format} {spec.n}:{spec.m}" if spec.format == "nm" else spec.format
        readers = "which compressed-tensors cannot read (the aqlm package can)" if spec.format == "vq" else \
            "which only secateurs reads"
        return f"{len(unreadable)} layer(s), e.g. {unreadable[0]}, are stored as {shown}, {readers}"
    if len({sparsity for sparsity, _ in names.values() if sparsity}) > 1:
        return "the layers mix two sparse formats, which compressed-tensors cannot read in one model"
    return None


def _compressed_tensors_config(specs: dict[str, LayerSpec], nonzeros: dict[str, int], act_order: set[str]) -> dict | None:
    """config.json's compressed-tensors quantization_config, or None if some layer has a layout
    compressed-tensors lacks (or the model mixes two sparse formats, which it cannot read)."""
    if compressed_tensors_problem(specs) is not None:
        return None
    names = {layer: FORMATS[spec.format].compressed_tensors_names(spec) for layer, spec in specs.items()}
    sparse_formats = {sparsity for sparsity, _ in names.values() if sparsity}
    config: dict = {"quant_method": "compressed-tensors", "sparsity_config": {}}
    if sparse_formats:
        sparse = sorted(layer for layer, (sparsity, _) in names.items() if sparsity)
        weights = sum(specs[layer].rows * specs[layer].cols for layer in sparse)
        config["sparsity_config"] = {
            "format": sparse_formats.pop(), "targets": sparse, "ignore": [],
            "sparsity_structure": "2:4" if specs[sparse[0]].format == "nm" else "unstructured",
            "global_sparsity": 1 - sum(nonzeros[layer] for layer in sparse) / weights,
        }
    groups: dict[tuple, list[str]] = {}
    for layer, (_, quantization) in sorted(names.items()):
        if quantization:
            spec = specs[layer]
            groups.setdefault((quantization, spec.bits, spec.group_size, spec.symmetric, layer in act_order), []).append(layer)
    if groups:
        formats = {key[0] for key in groups}
        config |= {"format": formats.pop() if len(formats) == 1 else "mixed-precision",
                   "quantization_status": "compressed", "ignore": [], "kv_cache_scheme": None,
                   "config_groups": {f"group_{index}": {
                       "targets": targets, "format": quantization, "input_activations": None, "output_activations": None,
                       "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
                                   "strategy": "group" if group_size else "channel", "group_size": group_size,
                                   # static groups: parameters by original column order, no g_idx
                                   "actorder": "static" if static else None, "observer": "minmax"}}
                       for index, ((quantization, bits, group_size, symmetric, static), targets) in enumerate(groups.items())}}
    return config


@dataclass
class EncodedBlock:
    """One block's tensors as stored: each linear layer in its chosen format, the rest as it is."""

    tensors: dict[str, Tensor]
    specs: dict[str, LayerSpec]  # compressed layer -> its format's spec
    nonzeros: dict[str, int]
    bytes_by_format: dict[str, int]  # tensor bytes; "dense" for the rest


def encode_block(block: nn.Module, prefix: str, stored: dict[str, Tensor], plan: StoragePlan) -> EncodedBlock:
    """Encode block `prefix` (its module, for the layer structure, and its tensors by full name as they
    are to be stored, dtype included)."""
    encoded = EncodedBlock({}, {}, {}, {})
    for name, module in linear_layers(block).items():
        layer = prefix + name
        weight = stored[f"{layer}.weight"]
        transposed = is_transposed(module)
        chosen = choose_format(layer, weight.t().contiguous() if transposed else weight, transposed, plan.grids.get(layer),
                               plan.nm.get(layer), plan.vq.get(layer), plan.pack_vq_codes)
        if chosen is None:
            continue
        spec, tensors = chosen
        encoded.specs[layer] = spec
        encoded.nonzeros[layer] = int((weight != 0).sum())
        encoded.tensors |= {f"{layer}.{suffix}": tensor.contiguous() for suffix, tensor in tensors.items()}
        encoded.bytes_by_format[spec.format] = encoded.bytes_by_format.get(spec.format, 0) + tensor_bytes(tensors)
    dense = {name: tensor for name, tensor in stored.items() if name.removesuffix(".weight") not in encoded.specs}
    encoded.bytes_by_format["dense"] = tensor_bytes(dense)
    encoded.tensors |= dense
    return encoded


def compressed_config(config: dict, specs: dict[str, LayerSpec], nonzeros: dict[str, int], act_order: set[str]) -> dict:
    """A model's config.json with the layers' formats recorded, and compressed-tensors'
    quantization_config where every layer has a compressed-tensors layout."""
    config = dict(config)
    config.pop("quantization_config", None)
    # transformers picks its loader by quant_method: compressed-tensors' where it can read every
    # layer, else ours (formats/hf_loading.py, registered by `import secateurs`).
    config["quantization_config"] = (_compressed_tensors_config(specs, nonzeros, act_order) or _aqlm_config(specs)
                                     or {"quant_method": "secateurs"})
    config[LAYOUT_KEY] = {"version": LAYOUT_VERSION, "layers": {layer: spec.as_json() for layer, spec in specs.items()}}
    return config


def _aqlm_config(specs: dict[str, LayerSpec]) -> dict | None:
    """aqlm's quantization_config (transformers' AqlmConfig) where every compressed layer is vq
    with one codebook shape; `linear_weights_not_to_quantize` is filled in by record_compression."""
    shapes = {(spec.format, spec.codebooks, spec.bits, spec.group_size) for spec in specs.values()}
    if len(shapes) != 1 or next(iter(shapes))[0] != "vq":
        return None
    _, books, bits, group_size = shapes.pop()
    return {"quant_method": AQLM_METHOD, "in_group_size": group_size, "out_group_size": 1, "num_codebooks": books,
            "nbits_per_codebook": bits, "linear_weights_not_to_quantize": []}


def record_compression(folder: Path, specs: dict[str, LayerSpec], nonzeros: dict[str, int], act_order: set[str]) -> None:
    """Rewrite the config.json of `folder` (written by the source) as compressed_config says."""
    config = compressed_config(json.loads((folder / CONFIG_FILE).read_text()), specs, nonzeros, act_order)
    if config["quantization_config"]["quant_method"] == AQLM_METHOD:
        # aqlm replaces every nn.Linear not listed here: list the 2-D weights of the others (the
        # embeddings too, harmlessly).
        stored = {name: meta for path in weight_files(folder) for name, meta in read_header(path).items()}
        keep = {name for name, meta in stored.items() if name.endswith(".weight") and len(meta.get("shape", ())) == 2
                and name.removesuffix(".weight") not in specs}
        if config.get("tie_word_embeddings", False):
            keep.add("lm_head.weight")  # tied to the embeddings, so not stored, but an nn.Linear all the same
        # Weight paths, as aqlm's checkpoints list them, and the module names, which transformers 5
        # matches against (a ".weight" path matches no module there).
        config["quantization_config"]["linear_weights_not_to_quantize"] = sorted(
            keep | {name.removesuffix(".weight") for name in keep})
    write_json(folder / CONFIG_FILE, config)


def save_compressed(model, plan_or_grids, output_dir, tokenizer=None, extra_files: dict[str, str] | None = None,
                    store_dtype: torch.dtype | None = None) -> SavedModel:
    """Write a model as a compressed directory, atomically (a temporary sibling, then one rename).

    Every linear layer of the decoder blocks gets the smallest format that holds it exactly: its
    grid from `plan_or_grids` (a StoragePlan, or {layer: (scale, zero)}) makes it quantized, an N:M
    entry of the plan makes it `nm`, and zeros make it `bitmask` where that is smaller than dense.
    Other tensors are stored as they are (floating ones in `store_dtype`, default their own).

    `model` is an nn.Module (written as one model.safetensors) or a secateurs.sources.BlockSource
    such as a pipeline.streaming.StreamedModel over a dense directory, read and written one block at
    a time (a shard per block and an index), so memory holds one block whatever the model's size."""
    sharded = isinstance(model, BlockSource)
    source = model if sharded else InMemoryModel(model, tokenizer, store_dtype)
    if store_dtype is not None:
        check_storable(store_dtype)
        source.store_dtype = store_dtype
    plan = StoragePlan.of(plan_or_grids)
    saved = SavedModel(Path(output_dir))
    specs, nonzeros = {}, {}
    n_blocks = len(source.blocks)
    with atomic_directory(saved.path) as staging:
        state, weight_map = {}, {}

        def add(encoded_bytes: dict[str, int]) -> None:
            for name, size in encoded_bytes.items():
                saved.bytes_by_format[name] = saved.bytes_by_format.get(name, 0) + size

        def write_shard(tensors: dict[str, Tensor], number: int) -> None:
            from safetensors.torch import save_file

            name = shard_name(number, n_blocks + 1)
            save_file(tensors, staging / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            saved.file_bytes += (staging / name).stat().st_size

        for index in range(n_blocks):
            block = source.load(index)
            encoded = encode_block(block, source.block_prefix(index), source.block_tensors(index), plan)
            source.release(index)
            specs |= encoded.specs
            nonzeros |= encoded.nonzeros
            add(encoded.bytes_by_format)
            if sharded:
                write_shard(encoded.tensors, index + 1)
            else:
                state |= encoded.tensors
        outside = source.outside_tensors()
        add({"dense": tensor_bytes(outside)})
        if sharded:
            write_shard(outside, n_blocks + 1)
            index_file = {"metadata": {"total_size": sum(saved.bytes_by_format.values())}, "weight_map": weight_map}
            (staging / INDEX_FILE).write_text(json.dumps(index_file, indent=2, sort_keys=True) + "\n")
        else:
            from safetensors.torch import save_file

            save_file(state | outside, staging / WEIGHTS_FILE, metadata={"format": "pt"})
            saved.file_bytes = (staging / WEIGHTS_FILE).stat().st_size
        source.describe(staging)
        record_compression(staging, specs, nonzeros, plan.act_order)
        saved.compressed_tensors_problem = compressed_tensors_problem(specs)
        saved.formats = {layer: spec.format for layer, spec in specs.items()}
        for filename, text in (extra_files or {}).items():
            (staging / filename).write_text(text)
        write_checksums(staging)
    return saved


