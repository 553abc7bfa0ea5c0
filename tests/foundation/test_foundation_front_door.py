"""The front door: `secateurs compress` and `secateurs.oneshot` write the compressed formats in the
stored dtype, in one pass, into a directory transformers loads after `import secateurs`."""

import json
import subprocess
import sys

import pytest
import torch
from foundation_helpers import tiny_llama, tiny_tokenizer, word_text
from safetensors import safe_open

import secateurs
from secateurs.cli import build_parser, main
from secateurs.models import save_model

FAST = ["--samples", "4", "--seqlen", "16"]


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16") / "dense"
    save_model(tiny_llama().to(torch.bfloat16), tiny_tokenizer(), folder)
    (folder.parent / "calib.txt").write_text(word_text(400))
    return folder


def stored(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys()}
    return tensors


def compress(bf16_dir, output, *extra):
    return main(["--quiet", "compress", "--model", str(bf16_dir), "--calib", str(bf16_dir.parent / "calib.txt"), *FAST,
                 "--output", str(output), *extra])


def test_bf16_model_is_written_compressed_in_bf16_and_transformers_loads_it(bf16_dir, tmp_path):
    assert compress(bf16_dir, tmp_path / "out") == 0
    tensors = stored(tmp_path / "out")
    floats = {name: t.dtype for name, t in tensors.items() if t.is_floating_point() and "weight_scale" not in name}
    assert set(floats.values()) == {torch.bfloat16}
    assert any(name.endswith(".bitmask") for name in tensors) and not any(
        name.endswith("down_proj.weight") for name in tensors)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["secateurs_compression"]["layers"]

    from transformers import AutoModelForCausalLM

    ours = secateurs.load(tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(theirs.model.layers[0].mlp.down_proj) is type(ours.model.layers[0].mlp.down_proj)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_transformers_loads_a_format_only_secateurs_reads(tmp_path):
    """bitmask-packed (sparse + 4-bit): config.json's quant_method is ours."""
    save_model(tiny_llama(), tiny_tokenizer(), tmp_path / "dense")
    (tmp_path / "calib.txt").write_text(word_text(400))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- sparsegpt: {sparsity: 0.5}\n- gptq: {bits: 4, group_size: 16}\n")
    assert main(["--quiet", "compress", "--model", str(tmp_path / "dense"), "--calib", str(tmp_path / "calib.txt"), *FAST,
                 "--recipe", str(recipe), "--output", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "secateurs"}
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(secateurs.load(tmp_path / "out")(ids).logits, theirs(ids).logits)


def test_dense_and_dtype_options(bf16_dir, tmp_path):
    assert compress(bf16_dir, tmp_path / "dense", "--dense") == 0
    dense = stored(tmp_path / "dense")
    assert dense["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert compress(bf16_dir, tmp_path / "fp32", "--dense", "--dtype", "float32") == 0
    assert stored(tmp_path / "fp32")["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    # The compressed output holds exactly the dense output's weights.
    assert compress(bf16_dir, tmp_path / "compressed") == 0
    back = secateurs.load(tmp_path / "compressed")
    assert torch.equal(back.model.layers[1].mlp.up_proj.to_dense(), dense["model.layers.1.mlp.up_proj.weight"])


def test_float16_cannot_be_compressed_but_can_be_written_dense(bf16_dir, tmp_path, capsys):
    assert compress(bf16_dir, tmp_path / "out", "--dtype", "float16") == 2
    assert "--dense" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert compress(bf16_dir, tmp_path / "out", "--dtype", "float16", "--dense") == 0


def test_oneshot_from_python(tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    texts = [word_text(200, seed=i) for i in range(3)]
    result = secateurs.oneshot(model, "sparsegpt-50", texts, tmp_path / "out", tokenizer=tokenizer, samples=4,
                               seqlen=16, progress=False)
    assert result.output_dir == tmp_path / "out" and result.model is model
    assert abs(result.report.as_dict()["totals"]["sparsity"] - 0.5) < 1e-6
    loaded = secateurs.load(tmp_path / "out")
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    in_memory = secateurs.oneshot(tiny_llama(), [{"wanda": {"sparsity": 0.5}}], torch.randint(1, 100, (4, 16)),
                                  progress=False)
    assert in_memory.output_dir is None and in_memory.report.layers


def test_command_line_shape():
    parser = build_parser()
    for command in (["compress", "--output", "x"], ["eval"], ["generate", "--prompt", "p"]):
        with pytest.raises(SystemExit):
            parser.parse_args(command)  # --model is required
    assert parser.parse_args(["dev", "prepare"]).run.__name__ == "cmd_prepare"
    top = subprocess.run([sys.executable, "-m", "secateurs.cli", "--help"], capture_output=True, text=True).stdout
    assert "bench-decode" not in top and "prepare" not in top and "dev" in top
    assert parser.parse_args(["eval", "--model", "m", "--quiet"]).quiet


def test_help_does_not_reexecute_or_import_torch():
    code = ("import sys; from secateurs.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "SECATEURS_MALLOC": "tuned"})
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr


def test_finetune_command_keeps_the_zeros_and_checks_its_input(bf16_dir, tmp_path, capsys):
    assert compress(bf16_dir, tmp_path / "sparse") == 0
    tune = ["--quiet", "finetune", "--model", str(tmp_path / "sparse"), "--data", str(bf16_dir.parent / "calib.txt"),
            "--steps", "2", "--seqlen", "16", "--batch", "2"]
    assert main([*tune, "--output", str(tmp_path / "a")]) == 2  # squarehead needs the teacher
    assert "--teacher" in capsys.readouterr().err
    assert main([*tune, "--output", str(tmp_path / "b"), "--lr", "0", "--loss", "ce"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main([*tune, "--output", str(tmp_path / "tuned"), "--teacher", str(bf16_dir)]) == 0
    before, after = secateurs.load(tmp_path / "sparse"), secateurs.load(tmp_path / "tuned")
    for name in ("q_proj", "o_proj"):
        old = getattr(before.model.layers[0].self_attn, name).to_dense()
        new = getattr(after.model.layers[0].self_attn, name).to_dense()
        assert torch.equal(old == 0, new == 0) and not torch.equal(old, new)  # same mask, trained values
