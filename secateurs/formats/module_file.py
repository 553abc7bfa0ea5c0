"""A compressed torch module that is not a transformers model (a diffusion UNet, a converted ONNX
graph) in one directory:

    model.safetensors   each compressed Linear and Conv2d weight in its registry format (a Conv2d as
                        its matrix [out, kh*kw*in], see algorithms/conv.py), every other tensor dense
    compression.json    {"version": 1, "layers": {layer: LayerSpec}, "conv_shapes": {layer: [out, in, kh, kw]},
                         "model": what the caller needs to rebuild the module (a diffusers config, an ONNX source),
                         "aliases": {tensor: an identical tensor stored in its place} (only where there are any)}
    checksums.sha256

Formats are chosen per layer as for language models (the smallest exact one). Reading validates
every layer against its spec and decodes the state dict in the module's own shapes, so
`module.load_state_dict(state)` restores the compressed model's dequantized weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from secateurs.algorithms.conv import as_matrix, matrix_to_conv
from secateurs.errors import FormatError, SecateursError
from secateurs.io import (WEIGHTS_FILE, atomic_directory, read_json_object, read_safetensors, verify_checksums, write_checksums, write_json,
                          write_safetensors)

from .directory import decode_tensors, refuse_non_directory
from .registry import LayerSpec, tensor_bytes
from .writing import SavedModel, StoragePlan, choose_format

MANIFEST_FILE = "compression.json"
MANIFEST_VERSION = 1


def compressible(module: nn.Module) -> bool:
    """A layer the formats hold compressed: a Linear, or a Conv2d with one group (a grouped or
    depthwise convolution is not one matrix product)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def save_compressed_module(model: nn.Module, plan: StoragePlan, output_dir, description: dict,
                           extra: Callable[[Path], None] | None = None) -> SavedModel:
    """Write `model`'s state with the layers `plan` names (grids, codebooks) in compressed formats.
    The weights must be exactly what the plan encodes (the engine leaves them so); a layer whose
    dense float weight is smaller stays dense. `description` is stored as the manifest's "model";
    `extra(folder)` may add files to the directory before it is put in place."""
    output = Path(output_dir)
    layers = {name: m for name, m in model.named_modules() if compressible(m)}
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    for layer in (*plan.grids, *plan.vq, *plan.nm):
        if layer not in layers:
            raise SecateursError(f"layer {layer}: the plan names it but the model has no such Linear or Conv2d")
    specs, conv_shapes, stored, saved = {}, {}, {}, SavedModel(output)
    for name, module in layers.items():
        weight = state[f"{name}.weight"]
        chosen = choose_format(name, as_matrix(weight), False, plan.grids.get(name), plan.nm.get(name), plan.vq.get(name),
                               plan.pack_vq_codes)
        if chosen is None:
            continue
        spec, tensors = chosen
        specs[name] = spec
        if weight.dim() == 4:
            conv_shapes[name] = list(weight.shape)
        del state[f"{name}.weight"]
        stored |= {f"{name}.{suffix}": tensor.contiguous() for suffix, tensor in tensors.items()}
        saved.formats[name] = spec.format
        saved.bytes_by_format[spec.format] = saved.bytes_by_format.get(spec.format, 0) + tensor_bytes(tensors)
    saved.bytes_by_format["dense"] = tensor_bytes(state)
    aliases = _identical_tensors(stored)
    for alias in aliases:  # stored once: the bytes count once
        fmt = specs[alias.rsplit(".", 1)[0]].format
        saved.bytes_by_format[fmt] -= tensor_bytes({alias: stored.pop(alias)})
    manifest = {"version": MANIFEST_VERSION, "layers": {name: spec.as_json() for name, spec in specs.items()},
                "conv_shapes": conv_shapes, "model": description}
    if aliases:
        manifest["aliases"] = aliases
    with atomic_directory(output) as staging:
        write_safetensors(staging / WEIGHTS_FILE, stored | state)
        write_json(staging / MANIFEST_FILE, manifest)
        if extra is not None:
            extra(staging)
        write_checksums(staging)
    saved.file_bytes = (output / WEIGHTS_FILE).stat().st_size
    saved.compressed_tensors_problem = "a module file, not a transformers directory"
    return saved


def _identical_tensors(tensors: dict[str, Tensor]) -> dict[str, str]:
    """{name: the first earlier name holding an identical tensor} (same dtype, shape and bytes): the
    file stores each such tensor once, e.g. vector-quantization codebooks shared by many layers."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in tensors.items():
        key = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).digest())
        if key in first and torch.equal(tensors[first[key]], tensor):
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
    return aliases


def read_compressed_module(path, verify: bool | None = None) -> tuple[dict, dict[str, Tensor], dict[str, LayerSpec]]:
    """(the manifest's "model" description, the dense state dict in the module's shapes, the layer
    specs) of a directory written by save_compressed_module; FormatError on anything inconsistent."""
    path = Path(path)
    refuse_non_directory(path)
    manifest = read_json_object(path / MANIFEST_FILE, f"{path}: not a compressed module directory (no {MANIFEST_FILE})")
    if manifest.get("version") != MANIFEST_VERSION \
            or not isinstance(manifest.get("layers"), dict) or not isinstance(manifest.get("conv_shapes"), dict):
        raise FormatError(f"{path / MANIFEST_FILE}: expected {{version: {MANIFEST_VERSION}, layers, conv_shapes, model}}")
    specs = {layer: LayerSpec.from_json(layer, entry) for layer, entry in manifest["layers"].items()}
    verify_checksums(path, verify)
    tensors = read_safetensors(path / WEIGHTS_FILE)
    aliases = manifest.get("aliases", {})
    if not isinstance(aliases, dict):
        raise FormatError(f"{path / MANIFEST_FILE}: aliases must be an object {{tensor: tensor it repeats}}")
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in tensors or alias in tensors:
            raise FormatError(f"{path / MANIFEST_FILE}: alias {alias!r} -> {target!r} does not name a stored tensor "
                              "(or the alias is stored too)")
        tensors[alias] = tensors[target]
    state = decode_tensors(specs, tensors)
    for layer, shape in manifest["conv_shapes"].items():
        spec = specs.get(layer)
        if spec is None or not (isinstance(shape, list) and len(shape) == 4 and all(type(d) is int and d > 0 for d in shape)) \
                or shape[0] != spec.rows or shape[1] * shape[2] * shape[3] != spec.cols:
            raise FormatError(f"{path / MANIFEST_FILE}: conv_shapes[{layer!r}] = {shape!r} does not fit its layer spec")
        state[f"{layer}.weight"] = matrix_to_conv(state[f"{layer}.weight"], torch.Size(shape))
    return manifest.get("model"), state, specs
