"""Every format: dense -> compressed -> dense is bit-exact, the loaded model's compressed modules
hold exactly the dense weights and compute what the dense model computes, bytes on disk add up."""

import json
import math
import struct

import pytest
import torch
from formats_helpers import EXPECTED_FORMAT, KINDS, MIXED, VOCAB, compress, dense_weights, tiny
from safetensors.torch import load_file

import secateurs
from secateurs.errors import SecateursError
from secateurs.formats import FORMATS, LayerSpec, decompress, load, read_compressed, save_compressed
from secateurs.structure import get_weight
from secateurs.runtime import CompressedLinear

TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_round_trip(model, plan, folder):
    before = dense_weights(model)
    saved = save_compressed(model, plan, folder / "compressed")
    decompress(folder / "compressed", folder / "dense")
    after = load_file(folder / "dense" / "model.safetensors")
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    loaded = load(folder / "compressed")
    for layer in saved.formats:
        module = loaded.get_submodule(layer)
        assert isinstance(module, CompressedLinear), layer
        assert torch.equal(module.to_dense(before[f"{layer}.weight"].dtype), get_weight(model.get_submodule(layer))), layer
    with torch.no_grad():
        expected, got = model(TOKENS).logits, loaded(TOKENS).logits
    # The kernels accumulate in float32, torch's bfloat16 matmul rounds differently.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 if expected.dtype == torch.float32 else 0.05)
    return saved


BF16_KINDS = ("bitmask", "nm", "int8-asym-g", "int4-g", "sparse-int8", "sparse-int4-g", "vq")  # one per format


@pytest.mark.parametrize(("kind", "dtype"), [(kind, "fp32") for kind in KINDS] + [(kind, "bf16") for kind in BF16_KINDS])
def test_every_format_round_trips_bit_exact(kind, dtype, tmp_path):
    model = tiny(dtype=DTYPES[dtype])
    saved = check_round_trip(model, compress(model, kind), tmp_path)
    assert set(saved.formats.values()) == {EXPECTED_FORMAT[kind]}
    assert len(saved.formats) == (12 if kind == "nm48" else 14)  # 4:8 leaves the 100-column down_proj dense


@pytest.mark.parametrize("kinds", ["bitmask", "int4-g", MIXED], ids=["bitmask", "int4", "mixed"])
def test_gpt2_conv1d_and_mixed_models_round_trip(kinds, tmp_path):
    arch = "gpt2" if isinstance(kinds, str) else "llama"
    model = tiny(arch)
    saved = check_round_trip(model, compress(model, kinds if arch == "llama" else {"attn": kinds, "mlp": kinds}), tmp_path)
    if arch == "llama":
        assert set(saved.formats.values()) == set(FORMATS)


def test_unpruned_float_layers_stay_dense_and_load_as_nn_linear(tmp_path):
    model = tiny()
    saved = save_compressed(model, None, tmp_path / "out")
    assert saved.formats == {} and not saved.compressed_tensors
    loaded = secateurs.load(tmp_path / "out")
    assert type(loaded.model.layers[0].mlp.down_proj) is torch.nn.Linear


def expected_bytes(spec: LayerSpec, nonzeros: int) -> int:
    """The size of a layer's tensors in each format, from the layouts of docs/formats.md."""
    rows, cols, groups = spec.rows, spec.cols, spec.groups
    item = 4 if spec.dtype == "float32" else 2
    mask, offsets_and_shape = rows * math.ceil(cols / 8), 8 * rows + 16

    def words(count):
        return 4 * math.ceil(count * spec.bits / 32)

    if spec.format.startswith("vq"):  # int8 or bit-packed codes, float16 codebooks and row scales
        codes_per_row = cols // spec.group_size * spec.codebooks
        codes = rows * (words(codes_per_row) if spec.format == "vq-packed" else codes_per_row)
        return codes + 2 * spec.codebooks * 2**spec.bits * spec.group_size + 2 * rows
    if FORMATS[spec.format].quantized:
        zero = 0 if spec.symmetric else (rows * groups if spec.bits == 8 else words(rows) * groups)
        grid = 4 * rows * groups + zero
    return {
        "bitmask": lambda: mask + offsets_and_shape + nonzeros * item,
        "nm": lambda: mask + 16 + rows * cols // spec.m * spec.n * item,
        "int8": lambda: rows * cols + grid,
        "pack-quantized": lambda: rows * words(cols) + 16 + grid,
        "bitmask-int8": lambda: mask + offsets_and_shape + nonzeros + grid,
        "bitmask-packed": lambda: mask + offsets_and_shape + words(nonzeros) + grid,
    }[spec.format]()


@pytest.mark.parametrize("kinds", ["bitmask", MIXED], ids=["bitmask", "mixed"])
def test_bytes_on_disk_per_format(kinds, tmp_path):
    model = tiny()
    plan = compress(model, kinds)
    saved = save_compressed(model, plan, tmp_path / "out")
    specs = read_compressed(tmp_path / "out").specs
    totals = {}
    for layer, spec in specs.items():
        nonzeros = int((get_weight(model.get_submodule(layer)) != 0).sum())
        totals[spec.format] = totals.get(spec.format, 0) + expected_bytes(spec, nonzeros)
    dense = sum(t.numel() * t.element_size() for name, t in dense_weights(model).items()
                if name.removesuffix(".weight") not in specs)
    assert saved.bytes_by_format == totals | {"dense": dense}
    file = (tmp_path / "out" / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", file[:8])[0]
    assert saved.file_bytes == len(file) == header + sum(saved.bytes_by_format.values())


def test_config_describes_the_compression_in_compressed_tensors_style(tmp_path):
    model = tiny()
    save_compressed(model, compress(model, {"q_proj": "int4-g", "k_proj": "int8", "o_proj": "int3-asym-g"}), tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "mixed-precision"
    groups = {(g["format"], g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["symmetric"]): g["targets"]
              for g in config["config_groups"].values()}
    assert groups == {
        ("pack-quantized", 4, 16, True): ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
        ("naive-quantized", 8, None, True): ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"],
        ("pack-quantized", 3, 16, False): ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"],
    }
    model = tiny()
    save_compressed(model, compress(model, "nm"), tmp_path / "nm")
    sparsity = json.loads((tmp_path / "nm" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["global_sparsity"] == 0.5 and len(sparsity["targets"]) == 14
    model = tiny()
    assert not save_compressed(model, compress(model, MIXED), tmp_path / "mixed").compressed_tensors  # has bitmask-packed
    assert json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"] == {"quant_method": "secateurs"}


def test_weights_off_their_grid_are_refused_before_anything_is_written(tmp_path):
    model = tiny()
    grids = compress(model, "int4-g")
    layer = next(iter(grids))
    get_weight(model.get_submodule(layer))[0, 0] += 1e-3
    with pytest.raises(SecateursError, match=f"layer {layer}: the weights are not exactly representable"):
        save_compressed(model, grids, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    model = tiny()
    target = tmp_path / "out"
    save_compressed(model, compress(model, "bitmask"), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_compressed(tiny(seed=1), None, target, BrokenTokenizer())
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_shared_row_masks_survive_int8_rounding_and_a_round_trip(tmp_path):
    """SparseGPT with mask_rows 4 then GPTQ int8: int8 rounding sends some kept weights to code 0, so
    the stored masks of a group differ; the loaded layers get their groups back (shared-mask kernels)."""
    from secateurs.pipeline.engine import compress_model
    from secateurs.runtime.modules import SparseQuantLinear

    model = tiny()
    calibration = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    report = compress_model(model, [{"sparsegpt": {"sparsity": 0.7, "mask_rows": 4}}, {"gptq": {"bits": 8}}],
                            calibration, progress=False)
    save_compressed(model, report.storage_plan(), tmp_path / "rows4")
    loaded = load(tmp_path / "rows4")
    layers = {name: m for name, m in loaded.named_modules() if isinstance(m, SparseQuantLinear)}
    assert layers and all(layer.mask_group >= 4 for layer in layers.values())
    for name, layer in layers.items():  # the restored groups hold explicit zeros: the same weights
        assert torch.equal(layer.to_dense(), get_weight(model.get_submodule(name)).float()), name
