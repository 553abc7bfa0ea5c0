"""`secateurs compress-denoiser` and secateurs.api.compress_denoiser on a diffusers directory and an
ONNX file: the written directory reloads to the compressed model; bad input is one line, exit 2."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from diffusers import UNet2DModel
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from secateurs.api import compress_denoiser, load_compressed_denoiser
from secateurs.cli import main


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                        norm_num_groups=4, num_class_embeds=3, attention_head_dim=8)
    folder = tmp_path_factory.mktemp("unet")
    model.save_pretrained(folder, safe_serialization=True)
    generator = torch.Generator().manual_seed(1)
    calibration = {}
    for call in range(3):
        calibration[f"{call}.sample"] = torch.randn(4, 1, 8, 8, generator=generator)
        calibration[f"{call}.timestep"] = torch.randint(0, 1000, (4,), generator=generator)
        calibration[f"{call}.class_labels"] = torch.randint(0, 3, (4,), generator=generator)
    save_file(calibration, folder / "calibration.safetensors")
    return folder


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_compresses_a_diffusers_unet_and_the_directory_reloads(unet_dir, tmp_path, capsys):
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, "-q", "compress-denoiser", "--model", str(unet_dir), "--recipe",
                             "tests/diffusion/vq-small.yaml", "--calibration", str(unet_dir / "calibration.safetensors"),
                             "--output", str(output), "--groups", "2", "--tune-steps", "5", "--tune-lr", "1e-3")
    assert code == 0, err
    assert "bits per weight" in out and "codebook tuning" in out
    assert not (tmp_path / "out.partial").exists()
    reloaded = load_compressed_denoiser(output)
    result = compress_denoiser(str(unet_dir), "tests/diffusion/vq-small.yaml", str(unet_dir / "calibration.safetensors"),
                               groups=2, tune_steps=5, tune_lr=1e-3, progress=False)
    for name, tensor in result.model.state_dict().items():  # the run is deterministic and the file exact
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_bad_denoiser_input_is_one_line(unet_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    save_file({"0.noise": torch.zeros(1)}, bad)
    for argv, fragment in [
        (["--model", str(unet_dir), "--calibration", str(bad)], "no input 'noise'"),
        (["--model", str(tmp_path), "--calibration", str(bad)], "neither a .onnx file nor a diffusers model directory"),
        (["--model", str(unet_dir), "--calibration", str(tmp_path / "missing.safetensors")], "missing"),
    ]:
        code, out, err = run_cli(capsys, "compress-denoiser", *argv, "--recipe", "gptq-w8", "--output",
                                 str(tmp_path / "o"))
        assert code == 2 and out == "" and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and fragment in err, err
        assert not (tmp_path / "o").exists()


def tiny_onnx(path):
    """x [n, 8, 6, 6] -> Conv 3x3 (16 out) -> x * sigmoid(x) -> Conv 1x1 (8 out), weights seeded."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2, rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((8, 16, 1, 1)).astype(np.float32) * 0.2
    nodes = [helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["h"], ["s"]), helper.make_node("Mul", ["h", "s"], ["a"]),
             helper.make_node("Conv", ["a", "conv2.weight"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 6, 6])],
                              [numpy_helper.from_array(w1, "conv1.weight"), numpy_helper.from_array(b1, "conv1.bias"),
                               numpy_helper.from_array(w2, "conv2.weight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_an_onnx_model_is_written_back_as_onnx_that_onnxruntime_runs(tmp_path):
    source = tmp_path / "tiny.onnx"
    tiny_onnx(source)
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    result = compress_denoiser(str(source), [{"gptq": {"bits": 3, "group_size": 8}}], [((), {"x": x})],
                               tmp_path / "out", groups=2, progress=False)
    assert set(result.report.layers) == {"conv1", "conv2"}
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    ours = result.model(x=x).detach().numpy()
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], ours, rtol=1e-5, atol=1e-5)
    reloaded = load_compressed_denoiser(tmp_path / "out")
    np.testing.assert_allclose(reloaded(x=x).detach().numpy(), ours, rtol=1e-6, atol=1e-6)
    source.write_bytes(source.read_bytes() + b"\0")  # the graph it describes changed
    with pytest.raises(Exception, match="missing or changed"):
        load_compressed_denoiser(tmp_path / "out")
