"""Resume after a kill: the finished blocks are kept in <output>.partial/, the result is bit-identical."""

import json
import shutil

import pytest
from pipeline_helpers import assert_identical, cli_subprocess, save_tiny

from secateurs.cli import main

# compress_layer is called once per layer: 7 per Llama block, so call 17 is inside block 2.
FAIL_AT_CALL = """
import secateurs.pipeline.engine as engine
original, calls = engine.compress_layer, [0]
def failing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 17:
        {failure}
    return original(*args, **kwargs)
engine.compress_layer = failing
"""


def compress_args(model, calib, output, *extra):
    return ["compress", "--model", str(model), "--calib", str(calib), "--samples", "6", "--seqlen", "16",
            "--output", str(output), *extra]


def crash_in_process(monkeypatch, args, capsys=None):
    """A bug inside block 2: exit code 1, one line naming the file that keeps the traceback."""
    import secateurs.pipeline.engine as engine

    original, calls = engine.compress_layer, []

    def failing(*arguments, **options):
        calls.append(None)
        if len(calls) == 17:
            raise RuntimeError("simulated crash")
        return original(*arguments, **options)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "compress_layer", failing)
        patch.setenv("SECATEURS_CACHE", str(args[args.index("--output") + 1]) + "-cache")
        assert main(args) == 1


def blocks_done(output):
    return json.loads((output.with_name(output.name + ".partial") / "manifest.json").read_text())["blocks_done"]


VQ_RECIPE = "stages: [{vq: {codebooks: 2, bits: 4, group_size: 8, rounds: 2, adam_steps: 3}}]\n"


@pytest.mark.parametrize("recipe", ["sparsegpt-50", "vq"])
def test_sigkill_mid_block_then_resume_is_bit_identical(tmp_path, tiny_dir, calib_file, recipe):
    if recipe == "vq":  # the finished blocks' codebooks come back from the partial folder's records
        (tmp_path / "vq.yaml").write_text(VQ_RECIPE)
        recipe = str(tmp_path / "vq.yaml")
    options = ["--stream", "--recipe", recipe]
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "reference", *options)) == 0
    killed = cli_subprocess(compress_args(tiny_dir, calib_file, tmp_path / "out", *options),
                            FAIL_AT_CALL.format(failure="import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "out").exists() and blocks_done(tmp_path / "out") == 2
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "out", *options, "--resume")) == 0
    assert_identical(tmp_path / "reference", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".yaml") == ["out", "reference"]
    report = json.loads((tmp_path / "out" / "compression.json").read_text())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(report["layers"]) == 28 and len(config["secateurs_compression"]["layers"]) == 28
    if recipe == "sparsegpt-50":
        assert report["totals"]["sparsity"] == 0.5


def test_resume_refuses_other_settings_then_continues(tmp_path, tiny_dir, calib_file, capsys, monkeypatch):
    output = tmp_path / "out"
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "reference", "--offload-activations")) == 0
    capsys.readouterr()
    crash_in_process(monkeypatch, compress_args(tiny_dir, calib_file, output, "--offload-activations"))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("secateurs: internal error") and "RuntimeError: simulated crash" in message, message
    crash_file = message.rsplit("traceback saved to ", 1)[1]
    assert "simulated crash" in open(crash_file).read()
    shutil.rmtree(tmp_path / "out-cache")
    assert blocks_done(output) == 2
    other_model = save_tiny(tmp_path / "other", seed=1)
    refusals = {
        "--resume": compress_args(tiny_dir, calib_file, output),  # a partial run is never silently reused
        "different recipe": compress_args(tiny_dir, calib_file, output, "--resume", "--recipe", "wanda-50"),
        "different model": compress_args(other_model, calib_file, output, "--resume"),
        "different calibration": compress_args(tiny_dir, calib_file, output, "--resume", "--seed", "3"),
    }
    for expected, args in refusals.items():
        capsys.readouterr()
        assert main(args) == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
        assert message.startswith("secateurs: error: ") and expected in message, message
    assert blocks_done(output) == 2  # refusals leave the partial run as it was
    assert main(compress_args(tiny_dir, calib_file, output, "--resume", "--offload-activations")) == 0
    assert_identical(tmp_path / "reference", output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out", "reference"]
