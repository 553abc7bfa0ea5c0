"""Run an ONNX graph in torch, node by node, with its weighted layers as real torch modules.

Compression works on torch modules (hooks collect a layer's inputs, the result goes into
`module.weight`), and an exported ONNX model such as the terrain diffusion UNet has no torch source.
OnnxGraphModule rebuilds one: each Conv, Gemm and MatMul whose weight is an initializer becomes an
nn.ConvNd / nn.Linear named after it, and the rest of the graph is evaluated op by op as the ONNX spec
(opsets 13 to 18) defines it, in float32. `write_onnx_with_weights` puts the module's weights back into
a copy of the file for onnxruntime. Integer tensors (shapes, axes) stay on the CPU whatever the
module's device: Reshape and friends read them with `.tolist()`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from secateurs.errors import FormatError
from secateurs.io import replace_atomically

OLDEST_OPSET = 13  # axes, splits and clip bounds became inputs here; older graphs are not read


def _where(node: onnx.NodeProto) -> str:
    return f"node {node.name or node.output[0]!r} ({node.op_type})"


def _attributes(node: onnx.NodeProto) -> dict:
    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def _to_torch(array: np.ndarray) -> torch.Tensor:
    return _float32(torch.from_numpy(np.array(array)))  # a copy: ONNX buffers are read-only


def _same_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Move CPU tensors (shapes, integer constants) to the device of the others, if that is elsewhere."""
    devices = {t.device for t in tensors if t.device.type != "cpu"}
    return [t.to(next(iter(devices))) for t in tensors] if devices else list(tensors)


def _reshape(attributes: dict, node) -> Callable:
    allow_zero = attributes.get("allowzero", 0)

    def run(x, shape):  # a 0 copies the input's size on that axis, unless allowzero
        target = shape.tolist()
        return x.reshape([x.shape[i] if size == 0 and not allow_zero else size for i, size in enumerate(target)])
    return run


def _unsqueeze(x: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    rank = x.dim() + axes.numel()  # negative axes count from the end of the output
    for axis in sorted(a % rank for a in axes.tolist()):
        x = x.unsqueeze(axis)
    return x


def _split(attributes: dict, node) -> Callable:
    axis, parts = attributes.get("axis", 0), attributes.get("num_outputs", len(node.output))

    def run(x, split=None):  # without `split`, equal parts, the last one possibly smaller
        return torch.split(x, split.tolist() if split is not None else math.ceil(x.shape[axis] / parts), axis)
    return run


def _gemm(attributes: dict, node) -> Callable:
    """Y = alpha * A' B' + beta * C, for a B computed at run time."""
    alpha, beta = attributes.get("alpha", 1.0), attributes.get("beta", 1.0)
    transpose_a, transpose_b = attributes.get("transA", 0), attributes.get("transB", 0)

    def run(a, b, c=None):
        y = alpha * ((a.t() if transpose_a else a) @ (b.t() if transpose_b else b))
        return y if c is None else y + beta * c
    return run


def _clip(x: torch.Tensor, low: torch.Tensor | None = None, high: torch.Tensor | None = None) -> torch.Tensor:
    bounds = [None if bound is None else bound.item() for bound in (low, high)]
    return x if bounds == [None, None] else torch.clamp(x, *bounds)


def _spatial_padding(attributes: dict, rank: int, node, torch_pads: bool = True):
    """(the padding the torch op takes, a function zero-padding the input first or None): torch pads both
    ends of an axis alike, ONNX pads may differ (and without `torch_pads`, the input is always padded)."""
    auto_pad = attributes.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):  # SAME_* pads depend on the input size; exporters write pads
        raise FormatError(f"{_where(node)}: auto_pad={auto_pad!r} is not supported")
    pads = list(attributes.get("pads", [0] * 2 * rank)) if auto_pad == "NOTSET" else [0] * 2 * rank
    begins, ends = pads[:rank], pads[rank:]
    if begins == ends and (torch_pads or not any(begins)):
        return tuple(begins), None
    widths = [w for b, e in zip(reversed(begins), reversed(ends)) for w in (b, e)]  # F.pad: last axis first
    return 0, lambda x: F.pad(x, widths)


def _average_pool(attributes: dict, node) -> Callable:
    kernel = attributes["kernel_shape"]
    rank = len(kernel)
    strides = attributes.get("strides", [1] * rank)
    if any(d != 1 for d in attributes.get("dilations", [1] * rank)):
        raise FormatError(f"{_where(node)}: dilated AveragePool is not supported")
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
    include_pad, ceil_mode = bool(attributes.get("count_include_pad", 0)), bool(attributes.get("ceil_mode", 0))
    _, pad_first = _spatial_padding(attributes, rank, node, torch_pads=False)  # torch's stop at half a kernel
    if pad_first is None:
        return lambda x: pool(x, kernel, strides, 0, ceil_mode)

    def run(x):
        total = pool(pad_first(x), kernel, strides, 0, ceil_mode, True)
        if include_pad:
            return total
        # the zeros added above are padding, not data: divide by the share of real pixels instead
        return total / pool(pad_first(torch.ones_like(x[:1, :1])), kernel, strides, 0, ceil_mode, True)
    return run


_RESIZE_COORDINATES = {  # (output index, scale, input size, output size) -> source coordinate
    "half_pixel": lambda i, scale, size_in, size_out: (i + 0.5) / scale - 0.5,
    "pytorch_half_pixel": lambda i, scale, size_in, size_out: (i + 0.5) / scale - 0.5 if size_out > 1 else i * 0,
    "align_corners": lambda i, scale, size_in, size_out: i * ((size_in - 1) / max(1, size_out - 1)),
    "asymmetric": lambda i, scale, size_in, size_out: i / scale,
}
_NEAREST_ROUNDING = {
    "floor": torch.floor, "ceil": torch.ceil,
    "round_prefer_floor": lambda x: torch.ceil(x - 0.5), "round_prefer_ceil": lambda x: torch.floor(x + 0.5),
}


def _resize(attributes: dict, node) -> Callable:
    """Nearest-neighbour resize (what the UNet's upsampling uses), axis by axis as the spec defines it:
    a source coordinate for each output index, rounded to an input index."""
    mode = attributes.get("mode", "nearest")
    coordinates = attributes.get("coordinate_transformation_mode", "half_pixel")
    source_coordinates = _RESIZE_COORDINATES.get(coordinates)
    rounding = _NEAREST_ROUNDING.get(attributes.get("nearest_mode", "round_prefer_floor"))
    unsupported = [f"{key}={value!r}" for key, value, allowed in (
        ("mode", mode, ("nearest",)), ("coordinate_transformation_mode", coordinates, tuple(_RESIZE_COORDINATES)),
        ("nearest_mode", attributes.get("nearest_mode", "round_prefer_floor"), tuple(_NEAREST_ROUNDING)),
        ("antialias", attributes.get("antialias", 0), (0,)), ("axes", attributes.get("axes"), (None,)),
        ("keep_aspect_ratio_policy", attributes.get("keep_aspect_ratio_policy", "stretch"), ("stretch",)),
    ) if value not in allowed]
    if unsupported:
        raise FormatError(f"{_where(node)}: unsupported Resize attribute {', '.join(unsupported)}")

    def run(x, roi=None, scales=None, sizes=None):
        if sizes is not None and sizes.numel():
            out_sizes = sizes.tolist()
            scales = [o / i for o, i in zip(out_sizes, x.shape)]
        else:
            scales = scales.tolist()
            out_sizes = [int(i * s) for i, s in zip(x.shape, scales)]
        if out_sizes == list(x.shape):
            return x  # as onnxruntime does, whatever the scales (the spec would resample)
        for axis, (size_in, size_out, scale) in enumerate(zip(x.shape, out_sizes, scales)):
            if size_in == size_out and scale == 1:
                continue
            index = torch.arange(size_out, dtype=torch.float32, device=x.device)  # float32, as onnxruntime
            source = source_coordinates(index, torch.tensor(scale, dtype=torch.float32), size_in, size_out)
            x = x.index_select(axis, rounding(source).clamp(0, size_in - 1).long())
        return x
    return run


def _filled(layer: torch.nn.Module, weight: np.ndarray, bias: np.ndarray | None) -> torch.nn.Module:
    layer.weight = torch.nn.Parameter(_to_torch(weight))
    if bias is not None:
        layer.bias = torch.nn.Parameter(_to_torch(bias).reshape(-1))
    return layer


def _fixed(function: Callable) -> Callable:
    return lambda attributes, node: function


def _binary(function: Callable) -> Callable:
    return _fixed(lambda a, b: function(*_same_device(a, b)))


# op type -> (attributes, node) -> the function of the node's inputs (None for an omitted optional one)
_OPS: dict[str, Callable] = {
    "Sqrt": _fixed(torch.sqrt), "Reciprocal": _fixed(torch.reciprocal), "Log": _fixed(torch.log),
    "Exp": _fixed(torch.exp), "Cos": _fixed(torch.cos), "Sin": _fixed(torch.sin), "Sigmoid": _fixed(torch.sigmoid),
    "Tanh": _fixed(torch.tanh), "Relu": _fixed(torch.relu), "Neg": _fixed(torch.neg), "Abs": _fixed(torch.abs),
    "Identity": _fixed(lambda x: x),
    # ONNX integer division truncates toward zero, as C does (torch's `/` would return floats), and
    # Pow keeps the base's type even under a float exponent
    "Div": _binary(lambda a, b: a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc")),
    "Pow": _binary(lambda a, b: torch.pow(a, b).to(a.dtype)),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "MatMul": _binary(torch.matmul),
    "Gemm": _gemm,
    "Reshape": _reshape, "Unsqueeze": _fixed(_unsqueeze), "Split": _split, "Clip": _fixed(_clip),
    "Shape": lambda a, node: lambda x: torch.tensor(x.shape[a.get("start", 0):a.get("end")], dtype=torch.int64),
    "Squeeze": _fixed(lambda x, axes=None: x.squeeze() if axes is None else x.squeeze(tuple(axes.tolist()))),
    "Concat": lambda a, node: lambda *xs: torch.cat(_same_device(*xs), a["axis"]),
    "Softmax": lambda a, node: lambda x: torch.softmax(x, a.get("axis", -1)),
    "Einsum": lambda a, node: lambda *xs: torch.einsum(a["equation"].replace(" ", ""), *_same_device(*xs)),
    "InstanceNormalization": lambda a, node: lambda x, scale, bias: F.instance_norm(
        x, weight=scale, bias=bias, eps=a.get("epsilon", 1e-5)),
    "AveragePool": _average_pool, "Resize": _resize,
}


@dataclass(frozen=True)
class _LayerBinding:
    """A layer module's initializers; Gemm's alpha and beta are folded into its weight and bias, and a
    [in, out] right operand (MatMul, Gemm transB=0) is transposed into nn.Linear's layout."""
    module_name: str
    weight_name: str
    bias_name: str | None
    transposed: bool = False
    alpha: float = 1.0
    beta: float = 1.0


class _Constants(torch.nn.Module):
    """The holder of the float initializers, as buffers; its own type, so no layer is placed inside."""


class OnnxGraphModule(torch.nn.Module):
    """An ONNX graph evaluated by torch; `forward` takes the graph inputs (positionally or by name)
    and returns its output, or a tuple of them when the graph has several."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        if opset < OLDEST_OPSET:
            raise FormatError(f"ONNX opset {opset}: only opset {OLDEST_OPSET} and later are supported")
        self._initializers = {t.name: t for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in self._initializers]
        self.output_names = [o.name for o in graph.output]
        self._bindings: list[_LayerBinding] = []
        self._layers_by_weight: dict[str, tuple[torch.nn.Module, tuple]] = {}
        self.constants = _Constants()  # buffers, so that .to(device) moves them
        self._buffer_names: dict[str, str] = {}  # ONNX name -> buffer name
        self._index_constants: dict[str, torch.Tensor] = {}  # integer tensors, kept on the CPU
        steps = []
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in (*_OPS, "Constant", "Conv"):
                raise FormatError(f"{_where(node)}: unsupported ONNX op type {node.domain or 'ai.onnx'}.{node.op_type}")
            attributes = _attributes(node)
            if node.op_type == "Constant":
                self._add_constant(node.output[0], self._constant_value(node, attributes))
                continue
            layer_step = self._layer_step(node, attributes) if node.op_type in ("Conv", "Gemm", "MatMul") else None
            run, inputs = layer_step or (_OPS[node.op_type](attributes, node), list(node.input))
            steps.append((run, inputs, list(node.output), _where(node)))
        self._steps = self._schedule(steps)
        del self._initializers  # what is needed now lives in the layers, the buffers and _index_constants

    @classmethod
    def from_onnx(cls, path_or_model: str | Path | onnx.ModelProto) -> OnnxGraphModule:
        return cls(_load(path_or_model))

    def _schedule(self, steps) -> list[tuple]:
        """The steps as (run, input names ("" for an omitted one), output names, names no later step reads);
        checks that every value is defined before it is read, and keeps the initializers steps read."""
        defined = set(self.input_names) | set(self._buffer_names) | set(self._index_constants)
        reads, last_read = steps + [(None, self.output_names, [], "graph output")], {}  # outputs: read last
        for index, (_, inputs, outputs, where) in enumerate(reads):
            for name in filter(None, inputs):
                if name not in defined and name in self._initializers:
                    self._add_constant(name, self._array(name))
                    defined.add(name)
                if name not in defined:
                    raise FormatError(f"{where}: {name!r} is neither a graph input nor computed before")
                last_read[name] = index
            defined.update(filter(None, outputs))
        forget = [[] for _ in reads]
        for name, index in last_read.items():
            forget[index].append(name)
        return [(run, inputs, outputs, gone) for (run, inputs, outputs, _), gone in zip(steps, forget)]

    def _add_constant(self, name: str, array: np.ndarray) -> None:
        tensor = _to_torch(array)
        if not tensor.is_floating_point():
            self._index_constants[name] = tensor
            return
        attribute = self._unique_name(self.constants, re.sub(r"\W", "_", name) or "constant")
        self.constants.register_buffer(attribute, tensor, persistent=False)
        self._buffer_names[name] = attribute

    @staticmethod
    def _constant_value(node: onnx.NodeProto, attributes: dict) -> np.ndarray:
        (kind, value), = attributes.items()  # a Constant has exactly one attribute
        if kind == "value":
            return numpy_helper.to_array(value)
        if kind not in ("value_float", "value_floats", "value_int", "value_ints"):
            raise FormatError(f"{_where(node)}: only tensor, float and int constants are supported, not {kind}")
        return np.array(value, dtype=np.float32 if "float" in kind else np.int64)

    @staticmethod
    def _unique_name(container: torch.nn.Module, name: str) -> str:
        candidate, number = name, 1
        while hasattr(container, candidate):
            number += 1
            candidate = f"{name}_{number}"
        return candidate

    def _place_layer(self, weight_name: str, layer: torch.nn.Module) -> str:
        """Register `layer` under its weight's name minus `.weight` as a module path (`network.input_blocks.0.0`),
        or where that cannot be (odd characters, a clash), under a sanitized unique top-level name."""
        path = weight_name.removesuffix(".weight")
        *containers, last = parts = path.split(".")
        parent = self
        if all(re.fullmatch(r"\w+", part) for part in parts):
            for part in containers:  # once one is created here, the rest of the path is free
                if part not in parent._modules and not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                if type(parent._modules.get(part)) is not torch.nn.Module:
                    break  # taken by a layer or an attribute
                parent = parent._modules[part]
            else:
                if not hasattr(parent, last):
                    parent.add_module(last, layer)
                    return path
        name = self._unique_name(self, re.sub(r"\W", "_", path))
        self.add_module(name, layer)
        return name

    def _layer(self, weight_name: str, bias_name: str | None, make: Callable, config=(), **binding) -> torch.nn.Module:
        """The module for a weight initializer, made once: a weight that two nodes share, configured
        alike, is one module called twice."""
        config = (bias_name, config, tuple(sorted(binding.items())))
        if weight_name in self._layers_by_weight:
            layer, known = self._layers_by_weight[weight_name]
            if known != config:
                raise FormatError(f"initializer {weight_name!r} is shared by layers configured differently")
            return layer
        layer = make()
        self._bindings.append(_LayerBinding(self._place_layer(weight_name, layer), weight_name, bias_name, **binding))
        self._layers_by_weight[weight_name] = (layer, config)
        return layer

    def _array(self, name: str | None) -> np.ndarray | None:
        return numpy_helper.to_array(self._initializers[name]) if name in self._initializers else None

    def _layer_step(self, node, attributes) -> tuple[Callable, list[str]] | None:
        """(run, inputs) calling a Conv/Linear module for a node whose weight is an initializer, else None."""
        weight = self._array(node.input[1])
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "MatMul":
            if weight is None or weight.ndim != 2:
                return None
            return self._linear(node.input[1], weight.T, None, None, transposed=True), [node.input[0]]
        if node.op_type == "Gemm":
            return self._gemm_step(node, attributes, weight, bias_name) if weight is not None else None
        bias = self._array(bias_name)
        if weight is None or (bias_name is not None and bias is None) or weight.ndim not in (3, 4, 5):
            raise FormatError(f"{_where(node)}: only 1-3d Conv with initializer weight and bias is supported")
        rank = weight.ndim - 2
        strides, dilations = attributes.get("strides", [1] * rank), attributes.get("dilations", [1] * rank)
        group = attributes.get("group", 1)
        padding, pad_first = _spatial_padding(attributes, rank, node)
        make = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[rank - 1]
        layer = self._layer(node.input[1], bias_name, lambda: _filled(make(
            weight.shape[1] * group, weight.shape[0], weight.shape[2:], strides, padding, dilations, group,
            bias=bias is not None), weight, bias), (tuple(strides), padding, tuple(dilations), group))
        return (lambda x: layer(pad_first(x))) if pad_first else layer, [node.input[0]]

    def _linear(self, weight_name, weight, bias_name, bias, **binding) -> torch.nn.Module:
        return self._layer(weight_name, bias_name, lambda: _filled(
            torch.nn.Linear(weight.shape[1], weight.shape[0], bias is not None), weight, bias), **binding)

    def _gemm_step(self, node, attributes, b: np.ndarray, c_name: str | None):
        """Y = alpha * A' B' + beta * C as a Linear holding alpha * B' and beta * C; a C that cannot be
        a Linear bias (computed at run time, or not of shape [N]) is added after the call."""
        alpha, beta = attributes.get("alpha", 1.0), attributes.get("beta", 1.0)
        transpose_a, transpose_b = attributes.get("transA", 0), attributes.get("transB", 0)
        if alpha == 0:  # a weight that does not count: nothing to compress
            return None
        weight = (b if transpose_b else b.T) * np.float32(alpha)
        c_name, c = (c_name, self._array(c_name)) if beta != 0 else (None, None)
        bias = c * np.float32(beta) if c is not None and c.shape in ((len(weight),), (1, len(weight))) else None
        layer = self._linear(node.input[1], weight, None if bias is None else c_name, bias,
                             transposed=not transpose_b, alpha=alpha, beta=beta)

        def run(a, c=None):
            y = layer(a.t() if transpose_a else a)
            return y if c is None else y + beta * c
        return run, [node.input[0], c_name if c_name and bias is None else ""]  # "": passed as None

    def forward(self, *inputs, **named_inputs):
        given = dict(zip(self.input_names, inputs), **named_inputs)
        if len(inputs) + len(named_inputs) != len(given) or sorted(given) != sorted(self.input_names):
            raise TypeError(f"the graph takes the inputs {', '.join(self.input_names)}, each once")
        values = dict(self._index_constants)
        values.update((name, getattr(self.constants, attribute)) for name, attribute in self._buffer_names.items())
        values.update((name, _float32(torch.as_tensor(value))) for name, value in given.items())
        for run, input_names, output_names, forget in self._steps:
            result = run(*[values[name] if name else None for name in input_names])
            if len(output_names) == 1:
                values[output_names[0]] = result
            else:
                values.update((name, part) for name, part in zip(output_names, result) if name)
            for name in forget:  # keeps the peak memory down
                del values[name]
        outputs = tuple(values[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


def _load(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    try:
        return onnx.load(str(source))
    except OSError:
        raise  # a missing or unreadable file is not a format problem
    except Exception as exc:  # protobuf's DecodeError and friends
        raise FormatError(f"{source}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def write_onnx_with_weights(source: str | Path | onnx.ModelProto, module: OnnxGraphModule,
                            output_path: str | Path) -> None:
    """Write `source` (the model `module` was built from) to `output_path`, atomically, with each Conv,
    Gemm and MatMul weight and bias replaced by the module's current values, in the initializers' dtypes."""
    model = onnx.ModelProto()
    model.CopyFrom(_load(source))  # never edit the caller's proto
    initializers = {t.name: t for t in model.graph.initializer}
    for binding in module._bindings:
        layer = module.get_submodule(binding.module_name)
        weight = layer.weight.detach().float() / binding.alpha
        pairs = [(binding.weight_name, weight.t() if binding.transposed else weight)]
        if binding.bias_name is not None:
            pairs.append((binding.bias_name, layer.bias.detach().float() / binding.beta))
        for name, value in pairs:
            original = initializers.get(name)
            if original is None or value.numel() != math.prod(original.dims):
                raise FormatError(f"initializer {name!r}: the model has no such tensor of {value.numel()} values")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(original.data_type)
            array = value.cpu().numpy().reshape(tuple(original.dims)).astype(dtype)
            original.CopyFrom(numpy_helper.from_array(array, name))
    replace_atomically(Path(output_path), lambda staging: staging.write_bytes(model.SerializeToString()))
