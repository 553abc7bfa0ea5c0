"""Find and load diffusion denoisers: a diffusers model directory (UNet2DModel, UNet2DConditionModel —
the SDXL UNet —, any diffusers ModelMixin with a config.json) or an ONNX graph (converted to torch by
secateurs.onnx_graph, its Conv and Gemm layers real Conv2d and Linear modules).

Weights are never unpickled: a diffusers directory must hold safetensors. A loaded denoiser comes with
a `description`, plain JSON that rebuilds the same module without its weights (build_denoiser), which
compressed module files store beside the compressed weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.io import CONFIG_FILE, file_sha256, read_json_object


@dataclass
class LoadedDenoiser:
    module: nn.Module
    description: dict  # {"kind": "diffusers", "class", "config"} or {"kind": "onnx", "source", "sha256"}
    input_names: tuple[str, ...]  # the keyword arguments its forward takes from a calibration file


def load_denoiser(spec) -> LoadedDenoiser:
    """A diffusers model directory, a .onnx file, or an nn.Module already built."""
    if isinstance(spec, nn.Module):
        return LoadedDenoiser(spec.eval(), {"kind": "module", "class": type(spec).__name__}, ())
    path = Path(spec)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise SecateursError(f"{path}: no such ONNX file")
        return _onnx(path, file_sha256(path))
    if not (path / CONFIG_FILE).is_file():
        raise SecateursError(f"{path}: neither a .onnx file nor a diffusers model directory (no {CONFIG_FILE})")
    config = _diffusers_config(path)
    cls = _diffusers_class(path, config)
    if not any(path.glob("*.safetensors")):
        raise SecateursError(f"{path}: no .safetensors weights (pickled .bin weights are not loaded)")
    try:
        module = cls.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SecateursError(f"{path}: diffusers could not load it ({str(exc).splitlines()[0]})") from None
    config = {key: value for key, value in json.loads(module.to_json_string()).items() if not key.startswith("_")}
    return LoadedDenoiser(module.eval(), {"kind": "diffusers", "class": cls.__name__, "config": config},
                          _forward_names(module))


def build_denoiser(description: dict) -> nn.Module:
    """The module a description names, with its weights as freshly built (for load_state_dict)."""
    kind = description.get("kind") if isinstance(description, dict) else None
    if kind == "diffusers":
        import diffusers

        cls = getattr(diffusers, str(description.get("class")), None)
        if cls is None or not isinstance(description.get("config"), dict):
            raise SecateursError(f"description names no diffusers model class: {description.get('class')!r}")
        return cls.from_config(description["config"]).eval()
    if kind == "onnx":
        source = Path(str(description.get("source")))
        if not source.is_file() or file_sha256(source) != description.get("sha256"):
            raise SecateursError(f"the ONNX graph this model was compressed from is missing or changed: {source}")
        return _onnx(source, description["sha256"]).module
    raise SecateursError(f"cannot rebuild a denoiser of kind {kind!r} (only diffusers and onnx models)")


def _onnx(path: Path, sha256: str) -> LoadedDenoiser:
    import onnx

    from secateurs.onnx_graph import OnnxGraphModule

    try:
        graph = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, ValueError, OSError... for a bad file
        raise SecateursError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    initializers = {t.name for t in graph.graph.initializer}
    names = tuple(i.name for i in graph.graph.input if i.name not in initializers)
    return LoadedDenoiser(OnnxGraphModule.from_onnx(graph).eval(), {"kind": "onnx", "source": str(path.resolve()),
                                                                   "sha256": sha256}, names)


def _diffusers_config(path: Path) -> dict:
    config = read_json_object(path / CONFIG_FILE, f"{path}: no {CONFIG_FILE}")
    if not isinstance(config.get("_class_name"), str):
        raise SecateursError(f"{path / CONFIG_FILE}: not a diffusers model config (no _class_name)")
    return config


def _diffusers_class(path: Path, config: dict):
    import diffusers

    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise SecateursError(f"{path}: {config['_class_name']!r} is not a diffusers model class "
                             f"(a pipeline directory? point at its unet/ folder)")
    return cls


def _forward_names(module: nn.Module) -> tuple[str, ...]:
    import inspect

    parameters = inspect.signature(module.forward).parameters
    return tuple(name for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
