"""OnnxGraphModule (secateurs.onnx_graph) against onnxruntime: small graphs built with onnx.helper for
every op it implements, the Conv/Linear modules it exposes (hooks, weights written back to ONNX),
and the real terrain diffusion UNet that adaptive-terrain-diffusion ships."""

import importlib.resources
import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from secateurs.errors import FormatError
from secateurs.onnx_graph import OnnxGraphModule, write_onnx_with_weights

ort = pytest.importorskip("onnxruntime")

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
TOLERANCE = 1e-5  # max abs error, relative to the output's scale (at least 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; onnxruntime gets one thread too
    yield
    torch.set_num_threads(threads)


def make_model(nodes, inputs, outputs, initializers=None) -> onnx.ModelProto:
    """inputs: {name: (elem type, shape)}; outputs: {name: elem type}; initializers: {name: array}."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(name, kind, shape) for name, (kind, shape) in inputs.items()],
        [helper.make_tensor_value_info(name, kind, None) for name, kind in outputs.items()],
        [numpy_helper.from_array(np.asarray(array), name) for name, array in (initializers or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # onnxruntime checks the graph itself when it loads it
    return model


def run_onnxruntime(model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_torch(module: OnnxGraphModule, feeds: dict) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(**{name: torch.from_numpy(value) for name, value in feeds.items()})
    return [tensor.numpy() for tensor in (result if isinstance(result, tuple) else (result,))]


def max_error(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The largest error over all outputs, each relative to its own scale (at least 1)."""
    assert len(expected) == len(got)
    worst = 0.0
    for want, have in zip(expected, got):
        assert have.shape == want.shape and have.dtype == want.dtype, (have.shape, want.shape, have.dtype)
        if want.size:
            scale = max(1.0, float(np.abs(want).max()))
            worst = max(worst, float(np.abs(have.astype(np.float64) - want).max()) / scale)
    return worst


def assert_matches(model, feeds) -> OnnxGraphModule:
    module = OnnxGraphModule.from_onnx(model)
    assert max_error(run_onnxruntime(model, feeds), run_torch(module, feeds)) <= TOLERANCE
    return module


RNG = np.random.default_rng(20240)  # one stream: two draws of one shape differ (q and k, say)


def normal(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def positive(*shape):
    return RNG.uniform(0.2, 3.0, shape).astype(np.float32)


# ---- element-wise ops -------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["Sqrt", "Reciprocal", "Log", "Exp", "Cos", "Sin", "Sigmoid", "Tanh", "Relu", "Neg",
                                "Abs", "Identity"])
def test_unary_ops(op):
    x = positive(2, 3, 4) if op in ("Sqrt", "Reciprocal", "Log") else normal(2, 3, 4, scale=3)
    model = make_model([helper.make_node(op, ["x"], ["y"])], {"x": (FLOAT, x.shape)}, {"y": FLOAT})
    assert_matches(model, {"x": x})


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow"])
def test_binary_ops_broadcast(op):
    """A graph input against a broadcast initializer, and against a 0-d constant (as the UNet uses)."""
    x = positive(2, 3, 4)
    nodes = [helper.make_node(op, ["x", "row"], ["a"]), helper.make_node(op, ["x", "scalar"], ["b"]),
             helper.make_node(op, ["row", "x"], ["c"])]
    model = make_model(nodes, {"x": (FLOAT, x.shape)}, {"a": FLOAT, "b": FLOAT, "c": FLOAT},
                       {"row": positive(4), "scalar": np.array(2.0, np.float32)})
    assert_matches(model, {"x": x})


def test_integer_shape_arithmetic():
    """Shape with start/end, integer Div truncating toward zero, Concat, Reshape with 0 and -1, with
    allowzero=1, Squeeze and Unsqueeze (negative axes, axes omitted)."""
    x = normal(2, 3, 4, 5)
    nodes = [
        helper.make_node("Shape", ["x"], ["full"]),
        helper.make_node("Shape", ["x"], ["head"], start=0, end=2),
        helper.make_node("Shape", ["x"], ["tail"], start=-1),
        helper.make_node("Div", ["full", "divisors"], ["divided"]),
        helper.make_node("Concat", ["head", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Reshape", ["x", "copy_dims"], ["flat_copy"]),
        helper.make_node("Reshape", ["x", "explicit"], ["flat_zero_allowed"], allowzero=1),
        helper.make_node("Unsqueeze", ["flat", "new_axes"], ["unsqueezed"]),
        helper.make_node("Squeeze", ["unsqueezed", "one_axis"], ["squeezed"]),
        helper.make_node("Squeeze", ["unsqueezed"], ["squeezed_all"]),
        helper.make_node("Mul", ["tail", "tail"], ["tail_squared"]),
    ]
    initializers = {"divisors": np.array([1, 1, 2, -2], np.int64), "minus_one": np.array([-1], np.int64),
                    "copy_dims": np.array([0, 0, -1], np.int64), "explicit": np.array([6, 20], np.int64),
                    "new_axes": np.array([-1, 1], np.int64), "one_axis": np.array([1], np.int64)}
    outputs = {"divided": INT64, "flat": FLOAT, "flat_copy": FLOAT, "flat_zero_allowed": FLOAT, "unsqueezed": FLOAT,
               "squeezed": FLOAT, "squeezed_all": FLOAT, "tail_squared": INT64}
    model = make_model(nodes, {"x": (FLOAT, x.shape)}, outputs, initializers)
    module = assert_matches(model, {"x": x})
    assert run_torch(module, {"x": x})[0].tolist() == [2, 3, 2, -2]  # 5 / -2 truncates to -2, not -3


def test_split_by_sizes_and_by_count():
    x = normal(2, 6, 5)
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=1),
             helper.make_node("Split", ["x"], ["d", "e", "f"], axis=1, num_outputs=3),
             helper.make_node("Split", ["x"], ["g", "h"], axis=-1, num_outputs=2)]  # 5 -> 3 + 2
    model = make_model(nodes, {"x": (FLOAT, x.shape)}, dict.fromkeys("abcdefgh", FLOAT),
                       {"sizes": np.array([1, 2, 3], np.int64)})
    assert_matches(model, {"x": x})


def test_constants_concat_and_clip():
    x = normal(2, 3, scale=3)
    nodes = [
        helper.make_node("Constant", [], ["tensor"], value=numpy_helper.from_array(normal(2, 3), "tensor")),
        helper.make_node("Constant", [], ["low"], value_float=-0.5),
        helper.make_node("Constant", [], ["shape"], value_ints=[3, 2]),
        helper.make_node("Concat", ["x", "tensor"], ["joined"], axis=-1),
        helper.make_node("Clip", ["joined", "low", "high"], ["clipped"]),
        helper.make_node("Clip", ["x", "", "high"], ["clipped_above"]),
        helper.make_node("Clip", ["x"], ["unclipped"]),
        helper.make_node("Reshape", ["x", "shape"], ["reshaped"]),
    ]
    model = make_model(nodes, {"x": (FLOAT, x.shape)}, dict.fromkeys(
        ["clipped", "clipped_above", "unclipped", "reshaped"], FLOAT), {"high": np.array(1.0, np.float32)})
    assert_matches(model, {"x": x})


# ---- attention and normalization, as the UNet's blocks use them ----------------------------------------

def test_attention_pieces():
    q, k = normal(2, 8, 16), normal(2, 8, 16)
    x = normal(2, 4, 6, 6, scale=2)
    nodes = [
        helper.make_node("Einsum", ["q", "k"], ["logits"], equation="bct,bcs->bts"),
        helper.make_node("Softmax", ["logits"], ["weights"], axis=-1),
        helper.make_node("Softmax", ["logits"], ["weights_axis1"], axis=1),
        helper.make_node("Einsum", ["weights", "k"], ["mixed"], equation="bts, bcs -> bct"),
        helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["normalized"], epsilon=1e-5),
    ]
    model = make_model(nodes, {"q": (FLOAT, q.shape), "k": (FLOAT, k.shape), "x": (FLOAT, x.shape)},
                       dict.fromkeys(["weights", "weights_axis1", "mixed", "normalized"], FLOAT),
                       {"scale": positive(4), "bias": normal(4)})
    assert_matches(model, {"q": q, "k": k, "x": x})


@pytest.mark.parametrize("attributes", [
    dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0], count_include_pad=1, ceil_mode=0),  # the UNet's
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    dict(kernel_shape=[3, 2], strides=[1, 2], pads=[0, 1, 2, 0], count_include_pad=0),
    dict(kernel_shape=[3, 2], strides=[1, 2], pads=[0, 1, 2, 0], count_include_pad=1),
    dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1),
])
def test_average_pool(attributes):
    x = normal(2, 3, 7, 9)
    model = make_model([helper.make_node("AveragePool", ["x"], ["y"], **attributes)], {"x": (FLOAT, x.shape)},
                       {"y": FLOAT})
    assert_matches(model, {"x": x})


@pytest.mark.parametrize("attributes, scales, sizes", [
    (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), [1, 1, 2, 2], None),
    (dict(mode="nearest"), [1, 1, 1.5, 0.6], None),
    # 5 rows stay 5 (int(5 * 1.19)) but are read at 1.19x (0, 0, 1, 2, 3) when another axis changes;
    # onnxruntime returns a tensor whose shape does not change as it is
    (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), [1, 1, 1.19, 2], None),
    (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), [1, 1, 1.19, 1], None),
    (dict(mode="nearest", coordinate_transformation_mode="align_corners", nearest_mode="ceil"), None, [2, 3, 9, 4]),
    (dict(mode="nearest", coordinate_transformation_mode="pytorch_half_pixel", nearest_mode="round_prefer_ceil"),
     None, [2, 3, 1, 7]),
    (dict(mode="nearest", nearest_mode="round_prefer_ceil"), [1, 1, 0.5, 1.7], None),
])
def test_resize(attributes, scales, sizes):
    """The first row is the UNet's upsampling; the others check the general rule for nearest."""
    x = normal(2, 3, 5, 6)
    initializers = {"scales": np.array(scales, np.float32)} if scales else {"sizes": np.array(sizes, np.int64)}
    inputs = ["x", "", "scales"] if scales else ["x", "", "", "sizes"]
    model = make_model([helper.make_node("Resize", inputs, ["y"], **attributes)], {"x": (FLOAT, x.shape)},
                       {"y": FLOAT}, initializers)
    assert_matches(model, {"x": x})


@pytest.mark.parametrize("attributes, message", [
    (dict(mode="linear"), "mode='linear'"),
    (dict(coordinate_transformation_mode="tf_crop_and_resize"), "coordinate_transformation_mode='tf_crop_and_resize'"),
    (dict(antialias=1), "antialias=1"),
])
def test_resize_rejects_what_it_does_not_implement(attributes, message):
    """Only nearest-neighbour resizing is implemented: the UNet uses nothing else."""
    model = make_model([helper.make_node("Resize", ["x", "", "scales"], ["y"], **attributes)],
                       {"x": (FLOAT, [1, 1, 4, 4])}, {"y": FLOAT}, {"scales": np.array([1, 1, 2, 2], np.float32)})
    with pytest.raises(FormatError, match=message):
        OnnxGraphModule.from_onnx(model)


def test_input_size_dependent_padding_is_refused():
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")],
                       {"x": (FLOAT, [1, 1, 4, 4])}, {"y": FLOAT}, {"w": normal(1, 1, 3, 3)})
    with pytest.raises(FormatError, match="SAME_UPPER"):
        OnnxGraphModule.from_onnx(model)


# ---- layers ----------------------------------------------------------------------------------------------

def conv_model():
    """Symmetric pads with bias, asymmetric pads, a grouped strided dilated conv and a 1x1 without bias."""
    nodes = [
        helper.make_node("Conv", ["x", "block.conv_in.weight", "block.conv_in.bias"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "block.asymmetric.weight", "block.asymmetric.bias"], ["b"], pads=[0, 1, 2, 1]),
        helper.make_node("Conv", ["b", "grouped.weight", "grouped.bias"], ["c"], group=2, strides=[2, 2],
                         dilations=[2, 1], pads=[1, 0, 1, 0]),
        helper.make_node("Conv", ["c", "onnx::Conv_7"], ["d"], strides=[2, 2], pads=[0, 1, 1, 0],
                         kernel_shape=[2, 2]),
    ]
    initializers = {"block.conv_in.weight": normal(4, 3, 3, 3, scale=0.3), "block.conv_in.bias": normal(4),
                    "block.asymmetric.weight": normal(6, 4, 3, 2, scale=0.3), "block.asymmetric.bias": normal(6),
                    "grouped.weight": normal(4, 3, 3, 3, scale=0.3), "grouped.bias": normal(4),
                    "onnx::Conv_7": normal(5, 4, 2, 2, scale=0.3)}
    return make_model(nodes, {"x": (FLOAT, [2, 3, 9, 11])}, {"d": FLOAT}, initializers)


def test_convolutions_become_conv2d_modules():
    module = assert_matches(conv_model(), {"x": normal(2, 3, 9, 11)})
    layers = dict(module.named_modules())
    for name in ("block.conv_in", "block.asymmetric", "grouped"):
        assert isinstance(layers[name], torch.nn.Conv2d), name
    assert layers["grouped"].groups == 2 and layers["grouped"].stride == (2, 2)
    assert isinstance(layers["onnx__Conv_7"], torch.nn.Conv2d)  # not a path: a sanitized name
    assert layers["onnx__Conv_7"].bias is None
    assert type(layers["block"]) is torch.nn.Module


def gemm_model():
    """Gemm transB=1 and 0 with alpha and beta, a C that is no bias ([M, N]), a Gemm without C, transA,
    and MatMul with an initializer right operand (batched left) and without one."""
    nodes = [
        helper.make_node("Gemm", ["x", "mlp.0.weight", "mlp.0.bias"], ["a"], transB=1, alpha=0.7, beta=1.3),
        helper.make_node("Gemm", ["a", "mlp.1.weight", "mlp.1.bias"], ["b"], transB=0, alpha=1.5, beta=0.5),
        helper.make_node("Gemm", ["b", "mlp.2.weight", "full_c"], ["c"], transB=1),
        helper.make_node("Gemm", ["c", "mlp.3.weight"], ["d"], transA=1),
        helper.make_node("Reshape", ["x", "batched"], ["x3"]),
        helper.make_node("MatMul", ["x3", "proj.weight"], ["e"]),
        helper.make_node("MatMul", ["c", "d"], ["f"]),
    ]
    initializers = {"mlp.0.weight": normal(6, 5, scale=0.5), "mlp.0.bias": normal(6),
                    "mlp.1.weight": normal(6, 7, scale=0.5), "mlp.1.bias": normal(1, 7),
                    "mlp.2.weight": normal(4, 7, scale=0.5), "full_c": normal(3, 4),
                    "mlp.3.weight": normal(3, 2, scale=0.5), "batched": np.array([3, 1, 5], np.int64),
                    "proj.weight": normal(5, 8, scale=0.5)}
    return make_model(nodes, {"x": (FLOAT, [3, 5])}, {"d": FLOAT, "e": FLOAT, "f": FLOAT}, initializers)


def test_gemm_and_matmul_become_linear_modules():
    module = assert_matches(gemm_model(), {"x": normal(3, 5)})
    layers = dict(module.named_modules())
    for name, (out_features, in_features) in {"mlp.0": (6, 5), "mlp.1": (7, 6), "mlp.2": (4, 7), "mlp.3": (2, 3),
                                              "proj": (8, 5)}.items():
        assert isinstance(layers[name], torch.nn.Linear), name
        assert (layers[name].out_features, layers[name].in_features) == (out_features, in_features), name
    assert layers["mlp.2"].bias is None and layers["proj"].bias is None  # an [M, N] C is added after the call


def hooked_inputs(module: OnnxGraphModule, feeds: dict) -> dict[str, tuple]:
    seen = {}

    def hook(name):
        def record(layer, args, output):
            seen[name] = tuple(args[0].shape)
        return record
    handles = [layer.register_forward_hook(hook(name)) for name, layer in module.named_modules()
               if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))]
    run_torch(module, feeds)
    for handle in handles:
        handle.remove()
    return seen


def test_forward_hooks_see_the_layer_inputs():
    module = OnnxGraphModule.from_onnx(conv_model())
    seen = hooked_inputs(module, {"x": normal(2, 3, 9, 11)})
    assert seen["block.conv_in"] == (2, 3, 9, 11)
    assert seen["block.asymmetric"] == (2, 4, 9 + 0 + 2, 11 + 1 + 1)  # asymmetric pads are applied before
    assert set(seen) == {"block.conv_in", "block.asymmetric", "grouped", "onnx__Conv_7"}
    seen = hooked_inputs(OnnxGraphModule.from_onnx(gemm_model()), {"x": normal(3, 5)})
    assert seen["mlp.0"] == (3, 5) and seen["mlp.3"] == (4, 3) and seen["proj"] == (3, 1, 5)


@pytest.mark.parametrize("make", [conv_model, gemm_model])
def test_changed_weights_written_back_run_alike_in_onnxruntime(make, tmp_path):
    model, feeds = make(), {"x": normal(2, 3, 9, 11) if make is conv_model else normal(3, 5)}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    module = OnnxGraphModule.from_onnx(model)
    before = run_torch(module, feeds)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                layer.weight.data = layer.weight.data * (1 + 0.2 * torch.randn(layer.weight.shape, generator=generator))
                if layer.bias is not None:
                    layer.bias.data += 0.1
    after = run_torch(module, feeds)
    assert max_error(before, after) > 1e-2  # the graph reads the modules' weights
    path = tmp_path / "changed.onnx"
    write_onnx_with_weights(model, module, path)
    assert max_error(run_onnxruntime(str(path), feeds), after) <= TOLERANCE
    assert [p.name for p in tmp_path.iterdir()] == ["changed.onnx"]  # no staging file left behind
    for tensor in model.graph.initializer:  # the caller's proto is left alone
        assert np.array_equal(numpy_helper.to_array(tensor), original[tensor.name])


def test_layer_names_that_cannot_be_paths_fall_back():
    """A path through another layer, or onto a module attribute, gets a sanitized unique name."""
    nodes = [helper.make_node("MatMul", ["x", "a.weight"], ["y"]),
             helper.make_node("MatMul", ["y", "a.b.weight"], ["z"]),
             helper.make_node("MatMul", ["z", "training.weight"], ["w"])]
    model = make_model(nodes, {"x": (FLOAT, [2, 3])}, {"w": FLOAT},
                       {"a.weight": normal(3, 3), "a.b.weight": normal(3, 3), "training.weight": normal(3, 3)})
    module = assert_matches(model, {"x": normal(2, 3)})
    layers = {name for name, layer in module.named_modules() if isinstance(layer, torch.nn.Linear)}
    assert layers == {"a", "a_b", "training_2"}


def test_forward_takes_inputs_by_position_or_name_and_checks_them():
    module = OnnxGraphModule.from_onnx(gemm_model())
    x = torch.from_numpy(normal(3, 5))
    by_position, by_name = module(x), module(x=x.double())  # float64 is computed in float32
    assert all(torch.equal(a, b) for a, b in zip(by_position, by_name))
    for args, named in [((), {}), ((x, x), {}), ((), {"y": x}), ((x,), {"x": x})]:
        with pytest.raises(TypeError, match="takes the inputs x"):
            module(*args, **named)


def test_unknown_op_is_refused_when_built():
    model = make_model([helper.make_node("Transpose", ["x"], ["y"])], {"x": (FLOAT, [2, 3])}, {"y": FLOAT})
    with pytest.raises(FormatError, match="Transpose"):
        OnnxGraphModule.from_onnx(model)
    custom = make_model([helper.make_node("Fancy", ["x"], ["y"], domain="com.example")], {"x": (FLOAT, [2, 3])},
                        {"y": FLOAT})
    with pytest.raises(FormatError, match="com.example.Fancy"):
        OnnxGraphModule.from_onnx(custom)


def test_unreadable_file_is_a_format_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(FormatError, match="broken.onnx"):
        OnnxGraphModule.from_onnx(path)


# ---- the real model --------------------------------------------------------------------------------------

def terrain_model_path():
    if importlib.util.find_spec("terrain_diffusion") is None:
        pytest.skip("adaptive-terrain-diffusion is not installed")
    path = importlib.resources.files("terrain_diffusion") / "weights" / "terrain_consistency_unet_difficulty100.onnx"
    if not path.is_file():
        pytest.skip("the terrain diffusion package ships no ONNX file here")
    return str(path)


def terrain_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The generator's inputs: sigma over the EDM range (the ends included), noisy = clean + sigma * noise
    for a smooth clean field, and difficulty labels (d - 1) / 99 for d in 1..100, as generator.py makes them."""
    generator = np.random.default_rng(seed)
    sigma = np.clip(np.exp(generator.normal(-1.2, 1.2, batch)), 0.002, 80.0)
    sigma[0], sigma[-1] = 0.002, 80.0
    coarse = generator.normal(0.0, 0.5, (batch, 1, 8, 8))
    clean = np.kron(coarse, np.ones((16, 16)))  # a blocky field, smoothed below
    clean = (clean + np.roll(clean, 8, -1) + np.roll(clean, 8, -2) + np.roll(clean, (8, 8), (-2, -1))) / 4
    noisy = clean + sigma[:, None, None, None] * generator.standard_normal((batch, 1, 128, 128))
    difficulty = (generator.integers(1, 101, batch) - 1) / 99
    return {"noisy": noisy.astype(np.float32), "sigma": sigma.astype(np.float32),
            "difficulty": difficulty.astype(np.float32)}


def test_terrain_unet_matches_onnxruntime():
    path = terrain_model_path()
    module = OnnxGraphModule.from_onnx(path)
    layers = list(module.modules())
    assert sum(isinstance(layer, torch.nn.Conv2d) for layer in layers) == 196
    assert sum(isinstance(layer, torch.nn.Linear) for layer in layers) == 59
    assert isinstance(dict(module.named_modules())["network.input_blocks.0.0"], torch.nn.Conv2d)
    feeds = terrain_inputs(4)
    expected, got = run_onnxruntime(path, feeds), run_torch(module, feeds)
    assert got[0].shape == (4, 1, 128, 128)
    assert max_error(expected, got) <= TOLERANCE
