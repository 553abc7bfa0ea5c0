"""`secateurs compress --save-compressed` and `secateurs decompress`."""

import json

import torch
from foundation_helpers import tiny_llama, tiny_tokenizer, word_text
from safetensors.torch import load_file

import secateurs
from secateurs.cli import main
from secateurs.models import save_model
from secateurs.io import SafetensorsFolder
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
    back = SafetensorsFolder(tmp_path / "back")  # one shard per block, as the compressed directory
    weights = back.read(back.files)
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


def test_stream_save_compressed_writes_a_shard_per_block_equal_to_the_in_memory_save(tmp_path, capsys):
    save_model(tiny_llama(), tiny_tokenizer(), tmp_path / "dense")
    (tmp_path / "calib.txt").write_text(word_text(400))
    assert main(["compress", "--model", str(tmp_path / "dense"), "--recipe", "sparsegpt-50", "--calib",
                 str(tmp_path / "calib.txt"), "--samples", "4", "--seqlen", "16", "--output", str(tmp_path / "out"),
                 "--stream", "--save-compressed"]) == 0
    out = tmp_path / "out"
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert shards == [f"model-{n:05d}-of-00003.safetensors" for n in (1, 2, 3)]  # 2 blocks, then the rest
    assert not (out / "model.safetensors").exists()
    assert {name for name, shard in weight_map.items() if shard == shards[1]} == set(load_file(out / shards[1]))
    assert all(name.startswith("model.layers.1.") for name in load_file(out / shards[1]))
    assert "model.layers.0.mlp.down_proj.bitmask" in weight_map and "model.layers.0.mlp.down_proj.weight" not in weight_map

    # The same layers and tensors as saving the decompressed model from memory in one file.
    assert main(["decompress", "--model", str(out), "--output", str(tmp_path / "back")]) == 0
    back_map = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(back_map.values())) == shards  # shard by shard, same names
    assert back_map["model.layers.0.mlp.down_proj.weight"] == shards[0]
    dense = secateurs.load(tmp_path / "back")
    from secateurs.formats import read_compressed, save_compressed

    save_compressed(dense, None, tmp_path / "memory")  # no report: the pruned layers become bitmask
    sharded, single = read_compressed(out), read_compressed(tmp_path / "memory")
    assert sharded.specs == single.specs
    for layer, tensors in single.layers.items():
        assert all(torch.equal(tensor, sharded.layers[layer][suffix]) for suffix, tensor in tensors.items())
    assert sharded.dense.keys() == single.dense.keys()
    assert all(torch.equal(tensor, sharded.dense[name]) for name, tensor in single.dense.items())
