"""Vector quantization through the engine: a vq recipe writes the vq format (aqlm's tensors), which
secateurs.load and transformers load to the engine's exact weights; bad files are refused."""

import json

import pytest
import torch
import transformers as tf
from pipeline_helpers import calibration, save_tiny
from safetensors.torch import load_file, save_file

import secateurs
from secateurs.errors import FormatError, SecateursError
from secateurs.runtime import VQLinear

# Small search on purpose (a test, not a benchmark): 16-word codebooks, two alternations.
RECIPE = [{"vq": {"codebooks": 2, "bits": 4, "group_size": 8, "rounds": 2, "adam_steps": 3}}]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vq")
    model_dir = save_tiny(folder / "dense")
    result = secateurs.oneshot(str(model_dir), RECIPE, calibration(), folder / "out", progress=False)
    return model_dir, folder / "out", result


def test_vq_output_loads_to_the_engine_weights(compressed):
    model_dir, output, result = compressed
    config = json.loads((output / "config.json").read_text())
    layers = config["secateurs_compression"]["layers"]
    assert len(layers) == 4 * 7 and {entry["format"] for entry in layers.values()} == {"vq"}
    entry = next(iter(layers.values()))
    assert (entry["codebooks"], entry["bits"], entry["group_size"]) == (2, 4, 8)
    quantization = config["quantization_config"]
    assert quantization | {"linear_weights_not_to_quantize": None} == {
        "quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 2, "nbits_per_codebook": 4,
        "linear_weights_not_to_quantize": None}
    assert "model.embed_tokens.weight" in quantization["linear_weights_not_to_quantize"]
    assert not any(".layers." in name for name in quantization["linear_weights_not_to_quantize"])

    loaded = secateurs.load(output)
    engine_model = result.model
    for name, module in loaded.named_modules():
        if name in layers:
            assert isinstance(module, VQLinear)
            assert torch.equal(module.to_dense(), engine_model.get_submodule(name).weight), name
    ids = calibration(2, 12, seed=5)
    with torch.no_grad():
        expected = engine_model(ids).logits
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-4, rtol=1e-4)
        one_row = loaded(ids[:1, :1]).logits  # batch 1: the kernel path
        assert torch.allclose(one_row, engine_model(ids[:1, :1]).logits, atol=1e-4, rtol=1e-4)
        # without the aqlm package, our quantizer answers for the aqlm config secateurs wrote
        hf = tf.AutoModelForCausalLM.from_pretrained(output)
        assert torch.allclose(hf(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_vq_codes_reproduce_the_layer_loss_and_report(compressed):
    _, output, _ = compressed
    report = json.loads((output / "compression.json").read_text())
    assert {layer["method"] for layer in report["layers"]} == {"vq"}
    assert all(layer["loss"] is not None and layer["loss"] >= 0 for layer in report["layers"])


def test_tampered_vq_files_are_refused(compressed, tmp_path):
    import shutil

    _, output, _ = compressed
    for suffix, tamper, message in (
        ("codes", lambda t: torch.full_like(t, 9), "outside the 16 words"),
        ("codebooks", lambda t: t.float().fill_(float("nan")).half(), "NaN"),
        ("scales", lambda t: t[:-1], "shape"),
    ):
        copy = tmp_path / suffix
        shutil.copytree(output, copy)
        (copy / "checksums.sha256").unlink()
        shard = next(copy.glob("model-00001-*.safetensors"))
        tensors = load_file(shard)
        name = next(key for key in tensors if key.endswith(f"self_attn.q_proj.{suffix}"))
        tensors[name] = tamper(tensors[name]).contiguous()
        save_file(tensors, shard)
        with pytest.raises(FormatError, match=message):
            secateurs.load(copy)


def test_vq_recipe_refuses_what_it_cannot_do(tmp_path):
    from secateurs.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="no pruning stage"):
        load_recipe([{"sparsegpt": {"sparsity": 0.5}}, {"vq": {}}])
    model_dir = save_tiny(tmp_path / "dense")
    with pytest.raises(SecateursError, match="group_size 7 does not divide"):
        secateurs.oneshot(str(model_dir), [{"vq": {"group_size": 7}}], calibration(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_block_fine_tuning_lowers_each_blocks_output_error(tmp_path):
    model_dir = save_tiny(tmp_path / "dense")
    recipe = [{"vq": RECIPE[0]["vq"] | {"block_steps": 30, "block_lr": 1e-3}}]
    result = secateurs.oneshot(str(model_dir), recipe, calibration(), tmp_path / "out", progress=False)
    blocks = json.loads((tmp_path / "out" / "compression.json").read_text())["blocks"]
    assert [b["block"] for b in blocks] == [0, 1, 2, 3]
    assert all(b["output_error_after"] <= b["output_error_before"] for b in blocks)
    assert any(b["output_error_after"] < 0.9 * b["output_error_before"] for b in blocks)
    loaded = secateurs.load(tmp_path / "out")  # the file holds exactly the tuned codebooks
    for name, module in loaded.named_modules():
        if isinstance(module, VQLinear):
            assert torch.equal(module.to_dense(), result.model.get_submodule(name).weight), name
