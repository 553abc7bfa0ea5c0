"""The command line: every user error is one line on stderr and exit code 2, never a traceback."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from secateurs.cli import main
from secateurs.data.corpus import load_text, tokenize
from secateurs.eval.perplexity import perplexity
from secateurs.models import load_model

from foundation_helpers import word_text


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, out, err, fragment, progress_allowed=False):
    """Exit code 2 and one error line; when a model was loaded first, transformers' "Loading weights"
    progress bar (a tqdm line redrawn with carriage returns) may precede it."""
    assert code == 2
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    if progress_allowed:
        lines = [line for line in lines if not line.startswith("Loading weights")]
    assert len(lines) == 1, err
    assert lines[0].startswith("secateurs: error:") and fragment in lines[0]
    assert err.rstrip("\n").endswith(lines[0])
    assert "Traceback" not in err and out == ""


@pytest.fixture
def words_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(word_text(300, seed=2))
    return path


def test_eval_json_matches_the_library(capsys, tiny_model_dir, words_file):
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--data", str(words_file),
                             "--seqlen", "16", "--max-tokens", "250", "--json")
    assert code == 0, err
    report = json.loads(out)
    loaded = load_model(tiny_model_dir)
    expected = perplexity(loaded.model, tokenize(loaded.tokenizer, load_text(str(words_file))), 16,
                          max_tokens=250, progress=False)
    assert report["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    assert (report["windows"], report["tokens_dropped"], report["model"]) == (15, 10, str(tiny_model_dir))


def test_eval_text_report(capsys, tiny_model_dir, words_file):
    code, out, _ = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--data", str(words_file), "--seqlen", "32")
    assert code == 0
    assert out.startswith("perplexity ") and "9 windows x 32 tokens (288 evaluated, 12 dropped)" in out


def test_missing_model(capsys):
    assert_one_line_error(*run_cli(capsys, "eval", "--model", "/nonexistent"), "model not found: /nonexistent")


def test_seqlen_above_model_context(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--seqlen", "99999")
    assert_one_line_error(code, out, err, "seqlen 99999 is above the model's maximum context of 64", True)


def test_empty_data_file(capsys, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--data", str(empty), "--seqlen", "16")
    assert_one_line_error(code, out, err, "the text is empty", True)


def test_bad_jsonl_line(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "w2 w3"}\n{oops}\n')
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--data", str(data), "--seqlen", "16")
    assert_one_line_error(code, out, err, "d.jsonl:2:", True)


def test_text_shorter_than_a_window(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("w2 w3 w4")
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--data", str(data), "--seqlen", "16")
    assert_one_line_error(code, out, err, "fewer than one window of 16", True)


def test_negative_max_tokens(capsys, tiny_model_dir, words_file):
    code, out, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir), "--data", str(words_file),
                           "--seqlen", "16", "--max-tokens", "-1")
    assert_one_line_error(code, out, err, "max_tokens must not be negative", True)


def test_model_directory_without_weights(capsys, tiny_model_dir, tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(tiny_model_dir, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    assert_one_line_error(*run_cli(capsys, "eval", "--model", str(directory)), "no .safetensors weights")


@pytest.mark.parametrize("threads", ["abc", "0", "-1"])
def test_bad_thread_count(capsys, monkeypatch, threads):
    monkeypatch.setenv("SECATEURS_THREADS", threads)
    assert_one_line_error(*run_cli(capsys, "eval", "--model", "/nonexistent"), "SECATEURS_THREADS")


def test_installed_entry_point_exit_code(tmp_path):
    script = Path(sys.executable).with_name("secateurs")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "secateurs.cli"]
    result = subprocess.run([*command, "eval", "--model", str(tmp_path / "absent")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("secateurs: error: model not found") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and result.stdout == ""
