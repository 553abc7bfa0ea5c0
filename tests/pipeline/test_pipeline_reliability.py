"""A user's mistakes are one line and exit 2 before any work; finished work is never lost or
silently wrong; two runs never share one output."""

import errno
import json
import os
import stat
import subprocess

import pytest
import torch
from pipeline_helpers import assert_identical, cli_subprocess, save_tiny

import secateurs.pipeline.partial as partial_module
from secateurs.cli import main
from secateurs.errors import SecateursError
from secateurs.io import OutputLock

FAST = ["--samples", "4", "--seqlen", "16"]


def compress_args(model, calib, output, *extra):
    return ["compress", "--model", str(model), "--calib", str(calib), *FAST, "--output", str(output), *extra]


def refused(capsys, code, expected):
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("secateurs: error: ") and expected in lines[-1], lines
    return lines


def entries(folder, *ignore):
    return sorted(p.name for p in folder.iterdir() if p.name not in ignore)


def manifest(output):
    return json.loads((output.with_name(output.name + ".partial") / "manifest.json").read_text())


# --- checked before any work ----------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device, expected", [("cuda", "no cuda device"), ("tpu9", "not a device")])
def test_a_device_this_machine_lacks(tmp_path, tiny_dir, calib_file, capsys, device, expected):
    refused(capsys, main(compress_args(tiny_dir, calib_file, tmp_path / "out", "--device", device)), expected)
    assert entries(tmp_path) == []  # no partial folder, no lock


def test_output_that_is_a_file_is_refused_even_with_overwrite(tmp_path, tiny_dir, calib_file, capsys):
    (tmp_path / "out").write_text("a file")
    refused(capsys, main(compress_args(tiny_dir, calib_file, tmp_path / "out", "--overwrite")), "is a file")
    assert (tmp_path / "out").read_text() == "a file" and entries(tmp_path) == ["out"]


def test_output_under_a_file_is_refused(tmp_path, tiny_dir, calib_file, capsys):
    (tmp_path / "file").write_text("x")
    refused(capsys, main(compress_args(tiny_dir, calib_file, tmp_path / "file" / "out")), "not a directory")


def _read_only_mount(folder):
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({done.stderr.decode().strip()})")
    return folder


def test_read_only_filesystem_is_named_not_blamed_on_disk_space(tmp_path, tiny_dir, calib_file, capsys):
    place = _read_only_mount(tmp_path / "ro")
    try:
        lines = refused(capsys, main(compress_args(tiny_dir, calib_file, place / "out")), "not writable")
        assert "Read-only file system" in lines[-1]
        refused(capsys, main(["decompress", "--model", str(tiny_dir), "--output", str(place / "dense")]),
                "not a secateurs compressed model")
    finally:
        subprocess.run(["umount", str(place)], check=False)


def test_seqlen_beyond_the_model_context(tmp_path, tiny_dir, calib_file, capsys):
    args = compress_args(tiny_dir, calib_file, tmp_path / "out")
    args[args.index("--seqlen") + 1] = "100000"
    refused(capsys, main(args), "exceeds the model's context of 64")
    assert entries(tmp_path) == []


def test_mistyped_relative_path_is_not_a_slow_hub_lookup(tmp_path, calib_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    lines = refused(capsys, main(["eval", "--model", "out/smol-50"]), "model not found: out/smol-50: no such path")
    assert len(lines) == 1 and "hub is unreachable" in lines[0]


def test_prompt_that_is_not_utf8(tiny_dir, capsys):
    refused(capsys, main(["generate", "--model", str(tiny_dir), "--prompt", "caf\udce9"]), "not valid UTF-8")


def test_gguf_given_to_decompress_and_load(tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    refused(capsys, main(["decompress", "--model", str(tmp_path / "model.gguf"), "--output", str(tmp_path / "d")]),
            "this is a GGUF file")
    import secateurs

    with pytest.raises(SecateursError, match="this is a GGUF file"):
        secateurs.formats.load(tmp_path / "model.gguf")


def test_errors_after_loading_are_the_only_output(tmp_path, tiny_dir, capsys):
    capsys.readouterr()
    lines = refused(capsys, main(["eval", "--model", str(tiny_dir), "--seqlen", "100000"]), "100000")
    assert len(lines) == 1, lines  # no "Loading weights" bar before it


# --- finished work ----------------------------------------------------------------------------

def test_disk_full_mid_run_keeps_the_finished_blocks(tmp_path, tiny_dir, calib_file, capsys, monkeypatch):
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "reference")) == 0
    original, calls = partial_module.write_safetensors, []

    def filling(path, tensors, metadata=None):
        calls.append(path.name)
        if len(calls) == 5:  # block 2's shard, after two blocks' shards and records
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, tensors, metadata)

    with monkeypatch.context() as patch:
        patch.setattr(partial_module, "write_safetensors", filling)
        lines = refused(capsys, main(compress_args(tiny_dir, calib_file, tmp_path / "out")), "disk full")
    assert "--resume" in lines[-1] and manifest(tmp_path / "out")["blocks_done"] == 2
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "out", "--resume")) == 0
    assert_identical(tmp_path / "reference", tmp_path / "out")
    assert entries(tmp_path) == ["out", "reference"]


def test_late_user_error_keeps_the_finished_blocks(tmp_path, tiny_dir, calib_file, capsys, monkeypatch):
    import secateurs.pipeline.engine as engine

    original, calls = engine.compress_layer, []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 22:  # in block 3 (7 layers a block)
            raise SecateursError("layer x: the Hessian is not positive definite")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "compress_layer", failing)
    lines = refused(capsys, main(compress_args(tiny_dir, calib_file, tmp_path / "out")), "not positive definite")
    assert "the 3 finished block(s) are kept" in lines[-1] and "--resume" in lines[-1]
    assert manifest(tmp_path / "out")["blocks_done"] == 3


def test_kill_during_the_final_rename_is_finished_by_resume(tmp_path, tiny_dir, calib_file, capsys):
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "reference")) == 0
    killed = cli_subprocess(compress_args(tiny_dir, calib_file, tmp_path / "out"), """
import os, signal
import secateurs.pipeline.partial as partial
partial.replace_directory = lambda source, target: os.kill(os.getpid(), signal.SIGKILL)
""")
    assert killed.returncode == -9, killed.stderr
    assert manifest(tmp_path / "out")["complete"] is True and not (tmp_path / "out").exists()
    refused(capsys, main(compress_args(tiny_dir, calib_file, tmp_path / "out")), "holds a finished run")
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "out", "--resume")) == 0
    assert_identical(tmp_path / "reference", tmp_path / "out")
    assert entries(tmp_path) == ["out", "reference"] and "manifest.json" not in entries(tmp_path / "out")


def test_a_second_run_on_a_locked_output_is_refused(tmp_path, tiny_dir, calib_file, capsys):
    with OutputLock(tmp_path / "out"):
        lines = refused(capsys, main(compress_args(tiny_dir, calib_file, tmp_path / "out")), "another run")
        assert f"pid {os.getpid()}" in lines[-1]
        assert entries(tmp_path) == ["out.lock"]
    assert entries(tmp_path) == []
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "out")) == 0  # the lock was released
    assert entries(tmp_path) == ["out"]


def test_lock_is_exclusive_across_processes(tmp_path):
    holder = subprocess.Popen(["python3", "-c", f"""
import fcntl, os, sys, time
handle = os.open({str(tmp_path / 'out.lock')!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(handle, fcntl.LOCK_EX)
os.write(handle, b"%d\\n" % os.getpid())
print("locked", flush=True)
time.sleep(30)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SecateursError, match=f"pid {holder.pid}"):
            OutputLock(tmp_path / "out").acquire()
    finally:
        holder.kill()
        holder.wait()
    OutputLock(tmp_path / "out").acquire().release()


# --- nothing silently wrong -------------------------------------------------------------------

@pytest.mark.parametrize("dense", [False, True], ids=["compressed", "dense"])
def test_one_flipped_bit_in_a_weight_is_an_error_naming_the_shard(tmp_path, tiny_dir, calib_file, capsys, dense):
    output = tmp_path / "out"
    assert main(compress_args(tiny_dir, calib_file, output, *(["--dense"] if dense else []))) == 0
    shard = sorted(output.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # an exponent bit of the last float
    shard.write_bytes(bytes(data))
    refused(capsys, main(["eval", "--model", str(output), "--max-tokens", "64"]), f"{shard.name}: damaged")
    if not dense:
        refused(capsys, main(["decompress", "--model", str(output), "--output", str(tmp_path / "d")]),
                f"{shard.name}: damaged")
        return
    os.environ["SECATEURS_VERIFY"] = "0"
    try:
        import secateurs

        secateurs.load(output)  # the opt-out loads it anyway (a dense float is not validated further)
    finally:
        del os.environ["SECATEURS_VERIFY"]


def test_outputs_follow_the_umask(tmp_path, tiny_dir, calib_file):
    previous = os.umask(0o022)
    try:
        assert main(compress_args(tiny_dir, calib_file, tmp_path / "out")) == 0
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_resume_after_a_kill_with_compressed_output_is_bit_identical(tmp_path, tiny_dir, calib_file):
    """Sparse + 4-bit blocks stored as bitmask-packed, read back and decoded for the resume."""
    recipe = tmp_path / "joint.yaml"
    recipe.write_text("- sparsegpt: {sparsity: 0.5}\n- gptq: {bits: 4, group_size: 16}\n")
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "reference", "--recipe", str(recipe))) == 0
    killed = cli_subprocess(compress_args(tiny_dir, calib_file, tmp_path / "out", "--recipe", str(recipe)), """
import os, signal
import secateurs.pipeline.engine as engine
original, calls = engine.compress_layer, [0]
def failing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 17:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
engine.compress_layer = failing
""")
    assert killed.returncode == -9, killed.stderr
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "out", "--recipe", str(recipe), "--resume")) == 0
    assert_identical(tmp_path / "reference", tmp_path / "out")
    layers = json.loads((tmp_path / "out" / "config.json").read_text())["secateurs_compression"]["layers"]
    assert "bitmask-packed" in {entry["format"] for entry in layers.values()}


def test_other_architectures_save_compressed_in_one_pass(tmp_path, calib_file):
    model = save_tiny(tmp_path / "gpt2", "gpt2")
    assert main(compress_args(model, calib_file, tmp_path / "out", "--recipe", "sparsegpt-2of4")) == 0
    import secateurs

    assert "NMLinear" in type(secateurs.load(tmp_path / "out").transformer.h[0].mlp.c_fc).__name__


def test_decompress_onto_a_full_disk_writes_nothing(tmp_path, tiny_dir, calib_file, capsys, monkeypatch):
    assert main(compress_args(tiny_dir, calib_file, tmp_path / "out")) == 0
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    refused(capsys, main(["decompress", "--model", str(tmp_path / "out"), "--output", str(tmp_path / "dense")]),
            "disk full while writing")
    assert entries(tmp_path) == ["out"]
