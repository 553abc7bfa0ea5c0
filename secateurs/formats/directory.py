"""Compressed model directories read back: validated, loaded as runtime modules, turned to dense.

A compressed directory is a transformers model directory whose `model.safetensors` (or the shards
of its `model.safetensors.index.json`) holds, for each compressed Linear layer, the tensors of its
format (registry.py) instead of `<layer>.weight`, and whose `config.json` records every layer's
format under `secateurs_compression` (writing.py writes them).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from secateurs.errors import FormatError, SecateursError
from secateurs.formats.registry import FORMATS, LAYOUT_KEY, LAYOUT_VERSION, LayerSpec, tensor_bytes
from secateurs.io import (CHECKSUMS_FILE, CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, atomic_directory, index_shards,
                          read_json_object, read_safetensors, verify_checksums, write_checksums)
from secateurs.sources import unique_state

GGUF_MAGIC = b"GGUF"

@dataclass
class CompressedDirectory:
    """A compressed directory read and validated: every layer's tensors passed its format's checks."""

    path: Path
    config: dict  # config.json without the compression keys: a plain dense model's config
    dtype: torch.dtype
    specs: dict[str, LayerSpec]
    layers: dict[str, dict[str, Tensor]]  # compressed layer -> suffix -> tensor
    dense: dict[str, Tensor]  # every other tensor of the file


def refuse_non_directory(path: Path) -> None:
    """A one-line error for a path that is not a model directory (a GGUF file gets its own)."""
    if path.is_dir():
        return
    if path.is_file():
        with open(path, "rb") as handle:
            if handle.read(4) == GGUF_MAGIC:
                raise SecateursError(f"{path}: this is a GGUF file, not a compressed model directory; "
                                     f"use it as --model to compress or evaluate it")
        raise SecateursError(f"{path}: not a model directory")
    raise SecateursError(f"{path}: not a model directory (no such path)")


def _read_config(path: Path) -> dict:
    refuse_non_directory(path)
    return read_json_object(path / CONFIG_FILE, f"{path}: not a model directory (no {CONFIG_FILE})")


def _read_shard(shard: Path, weight_map: dict[str, Path]) -> dict[str, Tensor]:
    """The tensors of one shard, each checked to be where the index puts it."""
    tensors = read_safetensors(shard)
    for name in tensors:
        if weight_map.get(name) != shard:
            where = weight_map[name].name if name in weight_map else None
            raise FormatError(f"tensor {name}: in {shard.name} but the index puts it in {where}")
    return tensors


def _read_weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of a directory: its model.safetensors, or the shards its index names."""
    weight_map = index_shards(path)
    if weight_map is None:
        return read_safetensors(path / WEIGHTS_FILE)
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors |= _read_shard(shard, weight_map)
    return tensors


def read_layout(path: Path) -> tuple[dict, dict[str, LayerSpec]]:
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


def read_compressed(path, verify: bool | None = None) -> CompressedDirectory:
    """Read and validate a compressed directory (SecateursError if it is not one); its shards'
    checksums are verified first (`verify` False, or SECATEURS_VERIFY=0, skips that)."""
    path = Path(path)
    config, specs = read_layout(path)
    verify_checksums(path, verify)
    dense = _read_weights(path)
    layers = _split_layers(specs, dense)
    return CompressedDirectory(path, config, _one_dtype(path, _float_dtypes(specs, dense)), specs, layers, dense)


def _build_model(directory: CompressedDirectory) -> nn.Module:
    """The architecture from config.json (the class its `architectures` names, e.g. a sequence
    classifier; a causal LM otherwise), weights left uninitialized (they are all loaded next)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = dict(directory.config)
    named = getattr(transformers, (config.get("architectures") or [""])[0] or "", None)
    try:
        hf_config = AutoConfig.for_model(config.pop("model_type", None), **config)
        with no_init_weights():
            if isinstance(named, type) and issubclass(named, transformers.PreTrainedModel):
                model = named._from_config(hf_config, dtype=directory.dtype)
            else:
                model = AutoModelForCausalLM.from_config(hf_config, dtype=directory.dtype)
        model.tie_weights()  # skipped with the weight initialization
        return model.eval()
    except Exception as exc:  # transformers raises many types on a bad config; name the file instead
        raise FormatError(f"{directory.path / CONFIG_FILE}: cannot build the model ({type(exc).__name__}: {exc})") from None


def load(path, verify: bool | None = None) -> nn.Module:
    """A compressed directory as a model whose compressed Linear layers are secateurs.runtime
    modules (every tensor validated first). `secateurs.load` also takes plain directories."""
    path = Path(path)
    directory = read_compressed(path, verify)
    model = _build_model(directory)
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


def decompress(path, output, verify: bool | None = None) -> Path:
    """Write the plain dense model directory of a compressed one (bit-exact weights), atomically.
    A sharded directory is decompressed one shard at a time into shards of the same names."""
    from safetensors.torch import save_file

    path, output = Path(path), Path(output)
    read_layout(path)  # a plain directory, a GGUF file or a missing path: one line before any work
    verify_checksums(path, verify)
    weight_map = index_shards(path)
    with atomic_directory(output) as staging:
        if weight_map is None:
            directory = read_compressed(path, verify=False)
            save_file(_dense_state(directory.specs, directory.layers, directory.dense), staging / WEIGHTS_FILE,
                      metadata={"format": "pt"})
            config = directory.config
        else:
            config, specs = read_layout(path)
            index_file = _decompress_shards(path, specs, weight_map, staging)
            (staging / INDEX_FILE).write_text(json.dumps(index_file, indent=2, sort_keys=True) + "\n")
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for item in path.iterdir():  # tokenizer, generation config, reports
            if item.is_file() and item.suffix != ".safetensors" and item.name not in (CONFIG_FILE, INDEX_FILE,
                                                                                      CHECKSUMS_FILE):
                shutil.copy2(item, staging / item.name)
        write_checksums(staging)
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
        weight = FORMATS[spec.format].decode(layers[layer], spec)
        state[f"{layer}.weight"] = weight.t().contiguous() if spec.transposed else weight
    return state


def decode_tensors(specs: dict[str, LayerSpec], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The dense tensors of stored ones (some layers in the formats `specs` names), each validated."""
    dense = dict(tensors)
    return _dense_state(specs, _split_layers(specs, dense), dense)
