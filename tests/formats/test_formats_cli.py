"""`secateurs compress --save-compressed` and `secateurs decompress`."""

import json

import torch
from foundation_helpers import tiny_llama, tiny_tokenizer, word_text
from safetensors.torch import load_file

import secateurs
from secateurs.cli import main
from secateurs.models import save_model
from secateurs.runtime import NMLinear


def test_compress_save_compressed_then_decompress(tmp_path, capsys):
    save_model(tiny_llama(), tiny_tokenizer(), tmp_path / "dense")
    (tmp_path / "calib.txt").write_text(word_text(400))
    assert main(["compress", "--model", str(tmp_path / "dense"), "--recipe", "sparsegpt-2of4", "--calib",
                 str(tmp_path / "calib.txt"), "--samples", "4", "--seqlen", "16", "--output", str(tmp_path / "out"),
                 "--save-compressed"]) == 0
    assert "compressed formats: nm" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {e["format"] for e in config["secateurs_compression"]["layers"].values()} == {"nm"}
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert json.loads((tmp_path / "out" / "compression.json").read_text())["recipe"]["name"] == "sparsegpt-2of4"
    model = secateurs.load(tmp_path / "out")
    assert isinstance(model.model.layers[1].mlp.down_proj, NMLinear)

    assert main(["decompress", "--model", str(tmp_path / "out"), "--output", str(tmp_path / "back")]) == 0
    weights = load_file(tmp_path / "back" / "model.safetensors")
    down = weights["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(down, model.model.layers[1].mlp.down_proj.to_dense())
    assert int((down.view(down.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_decompress_errors_are_one_line(tmp_path, capsys):
    save_model(tiny_llama(), tiny_tokenizer(), tmp_path / "dense")
    assert main(["decompress", "--model", str(tmp_path / "dense"), "--output", str(tmp_path / "out")]) == 2
    assert "not a secateurs compressed model" in capsys.readouterr().err
    assert main(["decompress", "--model", str(tmp_path / "dense"), "--output", str(tmp_path / "dense")]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
