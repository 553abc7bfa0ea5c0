"""Bad input anywhere in `compress`: one line, exit code 2, nothing partial left behind."""

from collections import namedtuple

import pytest
import yaml
from pipeline_helpers import word_text

from secateurs.cli import main

BAD_RECIPES = {
    "sparsity must be in [0, 1)": [{"sparsegpt": {"sparsity": 1.5}}],
    "N:M with 0 < N < M": [{"sparsegpt": {"mask": "4:4"}}],
    "bits must be": [{"gptq": {"bits": 9}}],
    "group_size 24 does not divide the 32 input columns": [{"gptq": {"bits": 4, "group_size": 24}}],
    "match no layer": [{"sparsegpt": {"sparsity": 0.5, "targets": ["no_such_layer"]}}],
}


def run_compress(tmp_path, model, calib, stream, *extra):
    args = ["compress", "--model", str(model), "--calib", str(calib), "--samples", "4", "--seqlen", "16",
            "--output", str(tmp_path / "out"), *(["--stream"] if stream else []), *extra]
    return main(args)


def assert_refused(capsys, code, expected):
    assert code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
    assert message.startswith("secateurs: error: ") and expected in message, message


def left_behind(tmp_path, *expected):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in expected)


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
@pytest.mark.parametrize("expected", list(BAD_RECIPES))
def test_bad_recipe(tmp_path, tiny_dir, calib_file, capsys, stream, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(BAD_RECIPES[expected]))
    assert_refused(capsys, run_compress(tmp_path, tiny_dir, calib_file, stream, "--recipe", str(recipe)), expected)
    assert left_behind(tmp_path, "recipe.yaml") == []


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_calibration_shorter_than_one_window(tmp_path, tiny_dir, capsys, stream):
    short = tmp_path / "short.txt"
    short.write_text(word_text(5))
    assert_refused(capsys, run_compress(tmp_path, tiny_dir, short, stream), "shorter than one window of 16")
    assert left_behind(tmp_path, "short.txt") == []


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path, tiny_dir, calib_file, capsys, stream):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    assert_refused(capsys, run_compress(tmp_path, tiny_dir, calib_file, stream), "exists (pass --overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
    assert run_compress(tmp_path, tiny_dir, calib_file, stream, "--overwrite") == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "compression.json").is_file()
    assert left_behind(tmp_path, "out") == []


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_not_enough_disk_space_is_checked_first(tmp_path, tiny_dir, calib_file, capsys, monkeypatch, stream):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("secateurs.pipeline.job.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    assert_refused(capsys, run_compress(tmp_path, tiny_dir, calib_file, stream), "not enough disk space")
    assert left_behind(tmp_path) == []


def test_stream_needs_a_safetensors_directory(tmp_path, calib_file, capsys):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert_refused(capsys, run_compress(tmp_path, tmp_path / "model.gguf", calib_file, True),
                   "streaming needs a model directory")
