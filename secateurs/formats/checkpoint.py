"""Compressed model directories: write them, load them as runtime modules, turn them back to dense.

A compressed directory is a transformers model directory whose `model.safetensors` (or the shards
of its `model.safetensors.index.json`) holds, for each compressed Linear layer, the tensors of its
format (registry.py) instead of `<layer>.weight`, and whose `config.json` records every layer's
format under `secateurs_compression` and, when every layer has a compressed-tensors layout, the
compressed-tensors `quantization_config`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from secateurs.errors import SecateursError
from secateurs.formats.registry import DTYPES, FORMATS, FormatError, LayerSpec, grid_codes, tensor_bytes
from secateurs.models import atomic_directory
from secateurs.pipeline.discovery import get_weight, is_transposed, linear_layers

LAYOUT_KEY = "secateurs_compression"
LAYOUT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class SavedModel:
    path: Path
    formats: dict[str, str] = field(default_factory=dict)  # compressed layer -> format name
    bytes_by_format: dict[str, int] = field(default_factory=dict)  # tensor bytes; "dense" for the rest
    file_bytes: int = 0  # model.safetensors, header included
    compressed_tensors: bool = False  # config.json has a compressed-tensors quantization_config


# --- saving ---------------------------------------------------------------------------------

def _layer_options(report_or_grids) -> tuple[dict, object]:
    """(grids by layer, recipe or None) from a CompressionReport or a plain {layer: (scale, zero)}."""
    from secateurs.pipeline.engine import CompressionReport
    from secateurs.recipe import load_recipe

    if isinstance(report_or_grids, CompressionReport):
        return report_or_grids.grids, load_recipe(report_or_grids.recipe)
    return dict(report_or_grids or {}), None


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
    codes = grid_codes(weight, grid, group_size, 255)
    bits = max(2, int(max(codes.max(), zero.max())).bit_length())
    return {"bits": bits, "group_size": group_size, "symmetric": bool((zero == 2 ** (bits - 1)).all())}


def _choose(layer: str, module: nn.Module, grid, nm) -> tuple[LayerSpec, dict[str, Tensor]] | None:
    """The smallest exact format for one layer, or None where its dense weight is smallest."""
    weight = get_weight(module).detach()
    if weight.dtype not in DTYPES.values():
        raise SecateursError(f"layer {layer}: dtype {weight.dtype} has no compressed format (float32, bfloat16)")
    dtype = next(name for name, value in DTYPES.items() if value == weight.dtype)
    base = {"rows": weight.shape[0], "cols": weight.shape[1], "dtype": dtype, "transposed": is_transposed(module)}
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
                tensors = FORMATS[name].compress(weight, spec, grid)
            except ValueError as exc:  # e.g. a group with more than n nonzeros
                raise SecateursError(f"layer {layer}: {exc}") from None
            candidate, size = (spec, tensors), tensor_bytes(tensors)
        if best_bytes is None or size < best_bytes:
            best, best_bytes = candidate, size
    if best is not None and not torch.equal(FORMATS[best[0].format].decompress(best[1], best[0]), weight):
        raise SecateursError(f"layer {layer}: the weights are not exactly representable in format {best[0].format} "
                             f"(quantized weights off their grid, or NaN)")
    return best


def _compressed_tensors_config(specs: dict[str, LayerSpec], nonzeros: dict[str, int], act_order: set[str]) -> dict | None:
    """config.json's compressed-tensors quantization_config, or None if some layer has a layout
    compressed-tensors lacks (or the model mixes two sparse formats, which it cannot read)."""
    names = {layer: FORMATS[spec.format].compressed_tensors_names(spec) for layer, spec in specs.items()}
    if not specs or None in names.values():
        return None
    sparse_formats = {sparsity for sparsity, _ in names.values() if sparsity}
    if len(sparse_formats) > 1:
        return None
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


def _compressed_block(source, index: int, grids: dict, recipe, saved: SavedModel, specs: dict, nonzeros: dict,
                      act_order: set) -> dict[str, Tensor]:
    """The tensors to store for block `index` of `source`: each linear layer in its chosen format,
    the rest of the block as it is. Records the layers' specs and byte counts in the arguments."""
    block = source.load(index)
    prefix = source.block_prefix(index)
    state = {}
    for name, module in linear_layers(block).items():
        layer = prefix + name
        prune, quant = recipe.stages_for(layer) if recipe else (None, None)
        nm = prune.nm if prune and prune.nm != (0, 0) else None
        chosen = _choose(layer, module, grids.get(layer), nm)
        if chosen is None:
            continue
        spec, tensors = chosen
        specs[layer] = spec
        nonzeros[layer] = int((get_weight(module) != 0).sum())
        if quant and quant.act_order:
            act_order.add(layer)
        state |= {f"{layer}.{suffix}": tensor.contiguous() for suffix, tensor in tensors.items()}
        saved.formats[layer] = spec.format
        saved.bytes_by_format[spec.format] = saved.bytes_by_format.get(spec.format, 0) + tensor_bytes(tensors)
    dense = {name: tensor for name, tensor in source.block_tensors(index).items()
             if name.removesuffix(".weight") not in specs}
    source.release(index)
    saved.bytes_by_format["dense"] = saved.bytes_by_format.get("dense", 0) + tensor_bytes(dense)
    return state | dense


def save_compressed(model, report_or_grids, output_dir, tokenizer=None,
                    extra_files: dict[str, str] | None = None) -> SavedModel:
    """Write a model as a compressed directory, atomically (a temporary sibling, then one rename).

    Every linear layer of the decoder blocks gets the smallest format that holds it exactly: its
    grid from `report_or_grids` (a CompressionReport, or {layer: (scale, zero)}) makes it quantized,
    an N:M mask of the report's recipe makes it `nm`, and zeros make it `bitmask` where that is
    smaller than dense. Other tensors are stored as they are.

    `model` is an nn.Module (written as one model.safetensors) or a pipeline.streaming.BlockSource
    such as a StreamedModel over a dense directory, which is read and written one block at a time
    (a shard per block and an index), so memory holds one block whatever the model's size."""
    from safetensors.torch import save_file

    from secateurs.pipeline.streaming import INDEX_FILE, BlockSource, InMemoryModel

    sharded = isinstance(model, BlockSource)
    source = model if sharded else InMemoryModel(model, tokenizer)
    grids, recipe = _layer_options(report_or_grids)  # None: no grids, no recipe
    saved = SavedModel(Path(output_dir))
    specs, nonzeros, act_order = {}, {}, set()
    n_blocks = len(source.blocks)
    shard_name = "model-{:05d}-of-{:05d}.safetensors".format
    with atomic_directory(saved.path) as staging:
        state, weight_map = {}, {}

        def write_shard(tensors: dict[str, Tensor], number: int) -> None:
            name = shard_name(number, n_blocks + 1)
            save_file(tensors, staging / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            saved.file_bytes += (staging / name).stat().st_size

        for index in range(n_blocks):
            block_state = _compressed_block(source, index, grids, recipe, saved, specs, nonzeros, act_order)
            if sharded:
                write_shard(block_state, index + 1)
            else:
                state |= block_state
        outside = source.outside_tensors()
        saved.bytes_by_format["dense"] = saved.bytes_by_format.get("dense", 0) + tensor_bytes(outside)
        if sharded:
            write_shard(outside, n_blocks + 1)
            index_file = {"metadata": {"total_size": sum(saved.bytes_by_format.values())}, "weight_map": weight_map}
            (staging / INDEX_FILE).write_text(json.dumps(index_file, indent=2, sort_keys=True) + "\n")
        else:
            save_file(state | outside, staging / WEIGHTS_FILE, metadata={"format": "pt"})
            saved.file_bytes = (staging / WEIGHTS_FILE).stat().st_size
        source.write_description(staging)
        ct_config = _compressed_tensors_config(specs, nonzeros, act_order)
        saved.compressed_tensors = ct_config is not None
        config = json.loads((staging / CONFIG_FILE).read_text())
        config.pop("quantization_config", None)
        if ct_config:
            config["quantization_config"] = ct_config
        config[LAYOUT_KEY] = {"version": LAYOUT_VERSION, "layers": {layer: spec.as_json() for layer, spec in specs.items()}}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for filename, text in (extra_files or {}).items():
            (staging / filename).write_text(text)
    return saved


# --- reading --------------------------------------------------------------------------------

@dataclass
class CompressedDirectory:
    """A compressed directory read and validated: every layer's tensors passed its format's checks."""

    path: Path
    config: dict  # config.json without the compression keys: a plain dense model's config
    dtype: torch.dtype
    specs: dict[str, LayerSpec]
    layers: dict[str, dict[str, Tensor]]  # compressed layer -> suffix -> tensor
    dense: dict[str, Tensor]  # every other tensor of the file


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise SecateursError(f"{path}: not a model directory (no {CONFIG_FILE})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path / CONFIG_FILE}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path / CONFIG_FILE}: not a JSON object")
    return config


def _read_tensors(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except FileNotFoundError:
        raise FormatError(f"{file}: missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # truncated or garbled header
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FormatError(f"{file}: not a readable safetensors file ({detail})") from None


def _read_shard(shard: Path, weight_map: dict[str, Path]) -> dict[str, Tensor]:
    """The tensors of one shard, each checked to be where the index puts it."""
    tensors = _read_tensors(shard)
    for name in tensors:
        if weight_map.get(name) != shard:
            where = weight_map[name].name if name in weight_map else None
            raise FormatError(f"tensor {name}: in {shard.name} but the index puts it in {where}")
    return tensors


def _read_weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of a directory: its model.safetensors, or the shards its index names."""
    from secateurs.pipeline.streaming import index_shards

    weight_map = index_shards(path)
    if weight_map is None:
        return _read_tensors(path / WEIGHTS_FILE)
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors |= _read_shard(shard, weight_map)
    return tensors


def _read_layout(path: Path) -> tuple[dict, dict[str, LayerSpec]]:
    """config.json without the compression keys (a plain dense model's config), and the layer specs."""
    config = _read_config(path)
    layout = config.pop(LAYOUT_KEY, None)
    config.pop("quantization_config", None)
    if layout is None:
        raise SecateursError(f"{path}: not a secateurs compressed model (config.json has no {LAYOUT_KEY})")
    if not isinstance(layout, dict) or layout.get("version") != LAYOUT_VERSION or not isinstance(layout.get("layers"), dict):
        raise FormatError(f"config.json: {LAYOUT_KEY} must be {{version: {LAYOUT_VERSION}, layers: {{...}}}}")
    return config, {layer: LayerSpec.from_json(layer, entry) for layer, entry in layout["layers"].items()}


def _split_layers(specs: dict[str, LayerSpec], tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Move each layer's tensors out of `tensors` (leaving the dense ones) and validate them."""
    layers = {}
    for layer, spec in specs.items():
        expected = FORMATS[spec.format].expected_tensors(spec)
        layers[layer] = {suffix: tensors.pop(f"{layer}.{suffix}") for suffix in expected if f"{layer}.{suffix}" in tensors}
    _refuse_dense_weights(specs, tensors)
    for layer, spec in specs.items():
        FORMATS[spec.format].validate(layer, layers[layer], spec)
    return layers


def _refuse_dense_weights(specs: dict[str, LayerSpec], tensors: dict[str, Tensor]) -> None:
    """`tensors` holds no `<layer>.weight` of a compressed layer (after its own tensors, which may
    be named `weight` too, were taken out)."""
    for layer, spec in specs.items():
        if f"{layer}.weight" in tensors:
            raise FormatError(f"tensor {layer}.weight: layer {layer} is compressed ({spec.format}) and has a dense weight too")


def _float_dtypes(specs: dict[str, LayerSpec], dense: dict[str, Tensor]) -> set[torch.dtype]:
    return {t.dtype for t in dense.values() if t.is_floating_point()} | {s.torch_dtype for s in specs.values()}


def _one_dtype(path: Path, dtypes: set[torch.dtype]) -> torch.dtype:
    if len(dtypes) != 1:
        raise FormatError(f"{path}: tensors of mixed float dtypes {sorted(map(str, dtypes))}")
    return next(iter(dtypes))


def read_compressed(path) -> CompressedDirectory:
    """Read and validate a compressed directory (SecateursError if it is not one)."""
    path = Path(path)
    config, specs = _read_layout(path)
    dense = _read_weights(path)
    layers = _split_layers(specs, dense)
    return CompressedDirectory(path, config, _one_dtype(path, _float_dtypes(specs, dense)), specs, layers, dense)


def _build_model(directory: CompressedDirectory) -> nn.Module:
    """The architecture from config.json, weights left uninitialized (they are all loaded next)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = dict(directory.config)
    try:
        hf_config = AutoConfig.for_model(config.pop("model_type", None), **config)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=directory.dtype)
        model.tie_weights()  # skipped with the weight initialization
        return model.eval()
    except Exception as exc:  # transformers raises many types on a bad config; name the file instead
        raise FormatError(f"{directory.path / CONFIG_FILE}: cannot build the model ({type(exc).__name__}: {exc})") from None


def load(path) -> nn.Module:
    """A compressed directory as a model whose compressed Linear layers are secateurs.runtime
    modules (every tensor validated first); a plain model directory loads as it is."""
    path = Path(path)
    if LAYOUT_KEY not in _read_config(path):
        from secateurs.models import load_model

        return load_model(path).model
    directory = read_compressed(path)
    model = _build_model(directory)
    from secateurs.pipeline.streaming import unique_state

    expected = {name: tensor for name, tensor in unique_state(model).items()
                if name.removesuffix(".weight") not in directory.specs}
    for name, tensor in directory.dense.items():
        if name not in expected:
            raise FormatError(f"tensor {name}: not a tensor of this {type(model).__name__}")
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise FormatError(f"tensor {name}: has {tensor.dtype} {tuple(tensor.shape)}, the model needs "
                              f"{expected[name].dtype} {tuple(expected[name].shape)}")
    missing = sorted(set(expected) - set(directory.dense))
    if missing:
        raise FormatError(f"tensor {missing[0]}: missing from the weights of {path} ({len(missing)} missing)")
    model.load_state_dict(directory.dense, strict=False)  # copies into the tied parameters too
    for layer, spec in directory.specs.items():
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise FormatError(f"config.json: layer {layer} is not a module of this {type(model).__name__}") from None
        weight_shape = tuple(module.weight.shape[::-1] if spec.transposed else module.weight.shape)
        if weight_shape != (spec.rows, spec.cols):
            raise FormatError(f"config.json: layer {layer} is [{spec.rows}, {spec.cols}], the model's is {list(weight_shape)}")
        bias = None if getattr(module, "bias", None) is None else module.bias.detach()
        model.set_submodule(layer, FORMATS[spec.format].module(directory.layers[layer], spec, bias))
    return model


def decompress(path, output) -> Path:
    """Write the plain dense model directory of a compressed one (bit-exact weights), atomically.
    A sharded directory is decompressed one shard at a time into shards of the same names."""
    from safetensors.torch import save_file

    from secateurs.pipeline.streaming import INDEX_FILE, index_shards

    path, output = Path(path), Path(output)
    weight_map = index_shards(path)
    with atomic_directory(output) as staging:
        if weight_map is None:
            directory = read_compressed(path)
            save_file(_dense_state(directory.specs, directory.layers, directory.dense), staging / WEIGHTS_FILE,
                      metadata={"format": "pt"})
            config = directory.config
        else:
            config, specs = _read_layout(path)
            index_file = _decompress_shards(path, specs, weight_map, staging)
            (staging / INDEX_FILE).write_text(json.dumps(index_file, indent=2, sort_keys=True) + "\n")
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for item in path.iterdir():  # tokenizer, generation config, reports
            if item.is_file() and item.suffix != ".safetensors" and item.name not in (CONFIG_FILE, INDEX_FILE):
                shutil.copy2(item, staging / item.name)
    return output


def _decompress_shards(path: Path, specs: dict[str, LayerSpec], weight_map: dict[str, Path], staging: Path) -> dict:
    """Decompress shard by shard into `staging`; a layer whose tensors span shards is written with the
    shard that completes it. Returns the new index."""
    from safetensors.torch import save_file

    expected = {layer: {f"{layer}.{suffix}" for suffix in FORMATS[spec.format].expected_tensors(spec)}
                for layer, spec in specs.items()}
    owner = {name: layer for layer, names in expected.items() for name in names}
    pending: dict[str, dict[str, Tensor]] = {}  # a layer's tensors until all its shards were read
    finished, dense_map, dtypes, total = set(), {}, set(), 0
    for shard in sorted(set(weight_map.values())):
        tensors = _read_shard(shard, weight_map)
        for name in [name for name in tensors if name in owner]:
            pending.setdefault(owner[name], {})[name] = tensors.pop(name)
        _refuse_dense_weights(specs, tensors)
        done = {layer: specs[layer] for layer, found in pending.items() if found.keys() == expected[layer]}
        for layer in done:
            tensors |= pending.pop(layer)
        layers = _split_layers(done, tensors)
        dtypes |= _float_dtypes(done, tensors)
        state = _dense_state(done, layers, tensors)
        if state:
            save_file(state, staging / shard.name, metadata={"format": "pt"})
            dense_map |= dict.fromkeys(state, shard.name)
            total += tensor_bytes(state)
        finished |= done.keys()
    # A layer with tensors missing from every shard: its format's check names one.
    _split_layers({layer: spec for layer, spec in specs.items() if layer not in finished},
                  {name: tensor for found in pending.values() for name, tensor in found.items()})
    _one_dtype(path, dtypes)
    return {"metadata": {"total_size": total}, "weight_map": dense_map}


def _dense_state(specs: dict[str, LayerSpec], layers: dict[str, dict[str, Tensor]], dense: dict[str, Tensor]) -> dict[str, Tensor]:
    state = dict(dense)
    for layer, spec in specs.items():
        weight = FORMATS[spec.format].decompress(layers[layer], spec)
        state[f"{layer}.weight"] = weight.t().contiguous() if spec.transposed else weight
    return state
