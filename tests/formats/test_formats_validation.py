"""Corrupt files are refused before any kernel sees them, with an error naming the tensor or the
config.json entry; and a fuzz of truncated and bit-flipped files never gets past that."""

import json
import re
import shutil

import pytest
import torch
from formats_helpers import MIXED, VOCAB, compress, tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from secateurs.errors import SecateursError
from secateurs.formats import FormatError, decompress, load, save_compressed

BLOCK = "model.layers.0"
Q, K, V, O = (f"{BLOCK}.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
GATE, UP, DOWN = (f"{BLOCK}.mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    """A tiny Llama with one layer per format (read-only: copy it to corrupt it)."""
    model = tiny()
    target = tmp_path_factory.mktemp("mixed") / "compressed"
    save_compressed(model, compress(model, MIXED), target)
    return target


def corrupted_copy(source, folder, tensors=None, config=None):
    """A copy of `source` with its tensors and/or config.json dict changed by the given functions,
    without its checksums (as a file from elsewhere: the validation itself is under test)."""
    shutil.copytree(source, folder)
    (folder / "checksums.sha256").unlink()
    if tensors:
        state = load_file(folder / "model.safetensors")
        tensors(state)
        save_file(state, folder / "model.safetensors")
    if config:
        data = json.loads((folder / "config.json").read_text())
        config(data)
        (folder / "config.json").write_text(json.dumps(data))
    return folder


def setitem(name, index, value):
    def change(state):
        state[name][index] = value
    return change


def xor_byte(name, index, mask):
    def change(state):
        state[name].view(-1)[index] ^= mask
    return change


def replace(name, function):
    def change(state):
        state[name] = function(state[name])
    return change


def drop(name):
    return lambda state: state.pop(name)


def layer_entry(layer, key, value):
    def change(config):
        config["secateurs_compression"]["layers"][layer][key] = value
    return change


TENSOR_CORRUPTIONS = {
    "bitmask bit flipped": (xor_byte(f"{DOWN}.bitmask", 0, 1), f"tensor {DOWN}.row_offsets: does not match"),
    "row offsets not increasing": (setitem(f"{DOWN}.row_offsets", 3, -5), f"tensor {DOWN}.row_offsets"),
    "values too short": (replace(f"{DOWN}.compressed", lambda t: t[:-1].clone()), f"tensor {DOWN}.compressed: has"),
    "bitmask padding bit": (xor_byte(f"{DOWN}.bitmask", 12, 0x10), f"tensor {DOWN}.bitmask: padding bits"),
    "NaN value": (setitem(f"{DOWN}.compressed", 0, float("nan")), f"tensor {DOWN}.compressed: holds NaN"),
    "2:4 group keeps 3": (xor_byte(f"{K}.bitmask", 0, 1), f"tensor {K}.bitmask: a group of 4 columns"),
    "2:4 values shape": (replace(f"{K}.compressed", lambda t: t[:, :-1].clone()), f"tensor {K}.compressed: has shape"),
    "packed padding bit": (setitem(f"{Q}.weight_packed", (0, -1), -(2**31)), f"tensor {Q}.weight_packed: padding"),
    "packed zero point padding": (setitem(f"{Q}.weight_zero_point", (-1, 0), -(2**31)), f"tensor {Q}.weight_zero_point: padding"),
    "packed words missing": (replace(f"{O}.weight_packed", lambda t: t[:, :-1].clone()), f"tensor {O}.weight_packed: has shape"),
    "negative scale": (setitem(f"{O}.weight_scale", (0, 0), -1.0), f"tensor {O}.weight_scale: holds a scale"),
    "NaN scale": (setitem(f"{V}.weight_scale", (1, 1), float("nan")), f"tensor {V}.weight_scale"),
    "wrong weight_shape": (setitem(f"{O}.weight_shape", 1, 47), f"tensor {O}.weight_shape: holds [48, 47]"),
    "wrong shape tensor": (setitem(f"{DOWN}.shape", 0, 7), f"tensor {DOWN}.shape: holds [7, 100]"),
    "int8 codes as int16": (replace(f"{V}.weight", lambda t: t.to(torch.int16)), f"tensor {V}.weight: has dtype torch.int16"),
    "missing zero point": (drop(f"{V}.weight_zero_point"), f"tensor {V}.weight_zero_point: missing"),
    "sparse int4 values short": (replace(f"{UP}.compressed", lambda t: t[:-1].clone()), f"tensor {UP}.compressed"),
    "sparse int8 offsets": (setitem(f"{GATE}.row_offsets", -1, 0), f"tensor {GATE}.row_offsets"),
    "dense weight beside compressed": (lambda s: s.__setitem__(f"{O}.weight", torch.zeros(48, 48)), f"tensor {O}.weight"),
    "unknown tensor": (lambda s: s.__setitem__("model.extra.weight", torch.zeros(2)), "tensor model.extra.weight: not a tensor"),
    "dense tensor shape": (replace("model.norm.weight", lambda t: t[:-1].clone()), "tensor model.norm.weight: has"),
    "dense tensor missing": (drop("model.norm.weight"), "tensor model.norm.weight: missing"),
}

CONFIG_CORRUPTIONS = {
    "unknown format": (layer_entry(Q, "format", "zip"), f"layer {Q}: format 'zip'"),
    "bits out of range": (layer_entry(V, "bits", 9), f"layer {V}: bits 9"),
    "group size not dividing": (layer_entry(O, "group_size", 7), f"layer {O}: group_size 7"),
    "negative rows": (layer_entry(O, "rows", -3), f"layer {O}: rows must be a positive integer"),
    "shape unlike the model's": (layer_entry(O, "rows", 40), f"tensor {O}.weight_packed: has shape"),
    "dtype unknown": (layer_entry(K, "dtype", "float16"), f"layer {K}: dtype 'float16'"),
    "unknown key": (layer_entry(K, "colour", 1), f"layer {K}: unknown key"),
    "layer not in the model": (lambda c: c["secateurs_compression"]["layers"].__setitem__(
        "model.layers.9.mlp.up_proj", c["secateurs_compression"]["layers"].pop(UP)), "model.layers.9.mlp.up_proj"),
    "layout version": (lambda c: c["secateurs_compression"].__setitem__("version", 2), "secateurs_compression must be"),
}


@pytest.mark.parametrize("case", list(TENSOR_CORRUPTIONS))
def test_corrupt_tensors_are_named(case, mixed_dir, tmp_path):
    change, message = TENSOR_CORRUPTIONS[case]
    folder = corrupted_copy(mixed_dir, tmp_path / "bad", tensors=change)
    with pytest.raises(FormatError, match=re.escape(message)):
        load(folder)
    if "dense tensor" not in case and "unknown tensor" not in case:  # the model is not built to decompress
        with pytest.raises(FormatError, match=re.escape(message)):
            decompress(folder, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


@pytest.mark.parametrize("case", list(CONFIG_CORRUPTIONS))
def test_corrupt_config_entries_are_named(case, mixed_dir, tmp_path):
    change, message = CONFIG_CORRUPTIONS[case]
    with pytest.raises(FormatError, match=re.escape(message)):
        load(corrupted_copy(mixed_dir, tmp_path / "bad", config=change))


def test_unreadable_files_are_one_line_errors(mixed_dir, tmp_path):
    folder = corrupted_copy(mixed_dir, tmp_path / "bad")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="config.json: unreadable"):
        load(folder)
    folder = corrupted_copy(mixed_dir, tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="model.safetensors: not a readable safetensors file"):
        load(folder)
    with pytest.raises(SecateursError, match="not a model directory"):
        load(tmp_path / "nowhere")


TOKENS = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_truncated_and_bit_flipped_files_fail_cleanly(data, mixed_dir, tmp_path_factory):
    """Whatever the damage, load() either refuses with a SecateursError or returns a model whose
    forward runs; nothing crashes in a kernel or escapes as another exception."""
    original = (mixed_dir / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(original[:8], "little")
    damage = data.draw(st.sampled_from(["truncate", "flip header", "flip data", "flip config"]))
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(mixed_dir, folder)
    if damage == "truncate":
        (folder / "model.safetensors").write_bytes(original[: data.draw(st.integers(0, len(original) - 1))])
    elif damage == "flip config":
        text = bytearray((folder / "config.json").read_bytes())
        text[data.draw(st.integers(0, len(text) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        (folder / "config.json").write_bytes(bytes(text))
    else:
        damaged = bytearray(original)
        start, end = (0, header) if damage == "flip header" else (header, len(original))
        for _ in range(data.draw(st.integers(1, 4))):
            damaged[data.draw(st.integers(start, end - 1))] ^= 1 << data.draw(st.integers(0, 7))
        (folder / "model.safetensors").write_bytes(bytes(damaged))
    try:
        model = load(folder)
    except SecateursError:
        return
    with torch.no_grad():
        assert model(TOKENS).logits.shape == (1, 6, VOCAB)


def sharded_copy(source, folder, corrupt_index=None):
    """`source` with its model.safetensors split into two shards and an index (changed by corrupt_index)."""
    shutil.copytree(source, folder)
    (folder / "checksums.sha256").unlink()
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, part in halves.items():
        save_file({name: state[name] for name in part}, folder / shard)
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {}, "weight_map": weight_map}
    if corrupt_index:
        corrupt_index(index)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_directory_loads_like_the_single_file(mixed_dir, tmp_path):
    folder = sharded_copy(mixed_dir, tmp_path / "sharded")
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        assert torch.equal(load(folder)(ids).logits, load(mixed_dir)(ids).logits)


def moved(index):
    index["weight_map"][f"{DOWN}.bitmask"] = "model-00001-of-00002.safetensors" \
        if index["weight_map"][f"{DOWN}.bitmask"].startswith("model-00002") else "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("corrupt, message", [
    (moved, f"tensor {DOWN}.bitmask: in model-0000"),
    (lambda index: index["weight_map"].update({f"{DOWN}.bitmask": "../elsewhere.safetensors"}), "shard files of this directory"),
    (lambda index: index["weight_map"].update({f"{DOWN}.bitmask": "model-00009-of-00009.safetensors"}), "missing"),
    (lambda index: index.pop("weight_map"), "unreadable"),
], ids=["wrong-shard", "path-outside", "missing-shard", "no-weight-map"])
def test_corrupt_index_is_named(mixed_dir, tmp_path, corrupt, message):
    folder = sharded_copy(mixed_dir, tmp_path / "sharded", corrupt)
    with pytest.raises(FormatError, match=re.escape(message)):
        load(folder)


def test_sharded_directory_decompresses_shard_by_shard(mixed_dir, tmp_path):
    """Layers split over two shards (tensors alternate) give the single file's dense tensors."""
    decompress(sharded_copy(mixed_dir, tmp_path / "sharded"), tmp_path / "from-shards")
    decompress(mixed_dir, tmp_path / "from-file")
    index = json.loads((tmp_path / "from-shards" / "model.safetensors.index.json").read_text())
    from_shards = {}
    for shard in sorted(set(index["weight_map"].values())):
        from_shards |= load_file(tmp_path / "from-shards" / shard)
    from_file = load_file(tmp_path / "from-file" / "model.safetensors")
    assert from_shards.keys() == from_file.keys() == index["weight_map"].keys()
    assert all(torch.equal(from_shards[name], tensor) for name, tensor in from_file.items())


def test_sharded_decompress_of_a_corrupt_directory_writes_nothing(mixed_dir, tmp_path):
    def drop_a_layer_tensor(index):
        index["weight_map"].pop(f"{DOWN}.row_offsets")

    folder = sharded_copy(mixed_dir, tmp_path / "sharded", drop_a_layer_tensor)
    with pytest.raises(FormatError, match=re.escape(f"{DOWN}.row_offsets")):
        decompress(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [folder]
