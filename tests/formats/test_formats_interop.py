"""compressed-tensors reads our files: each venv (scripts/interop_venvs.sh) decompresses them with
the library's own code and must get our dense weights exactly.

compressed-tensors 0.14.0 is the last release with the sparse compressors (sparse-bitmask,
sparse-24-bitmask) and needs transformers < 5; 0.20.0 reads pack-quantized and naive-quantized."""

import os
import subprocess
from pathlib import Path

import pytest
import torch
from formats_helpers import compress, tiny

from secateurs.formats import decompress, save_compressed

SCRIPT = Path(__file__).with_name("ct_decompress.py")
# (kind, dtype, relative tolerance): 0 is bit-exact. compressed-tensors 0.14 gives the scales of an
# int8 weight (sparse-bitmask over naive-quantized) float16 parameters, so its result is within
# float16 rounding of the scale.
CASES = {
    "venv-ct014": [("bitmask", torch.float32, 0), ("bitmask", torch.bfloat16, 0), ("nm", torch.float32, 0),
                   ("sparse-int8", torch.float32, 2**-10)],
    "venv-ct020": [("int4-g", torch.float32, 0), ("int4-g", torch.bfloat16, 0), ("int3-asym-g", torch.float32, 0),
                   ("int6-asym", torch.float32, 0), ("int8", torch.float32, 0), ("int8-asym-g", torch.float32, 0)],
}


@pytest.mark.interop
@pytest.mark.parametrize("venv", list(CASES))
def test_compressed_tensors_decompresses_our_files_exactly(venv, interop_venvs, tmp_path):
    python = interop_venvs / venv / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} missing: run scripts/interop_venvs.sh")
    arguments = []
    for kind, dtype, tolerance in CASES[venv]:
        # 112 columns, so that one group size fits every layer: transformers' loader applies the
        # first quantization scheme to every dense layer.
        model = tiny(dtype=dtype, intermediate=112)
        folder = tmp_path / f"{kind}-{str(dtype).removeprefix('torch.')}"
        assert save_compressed(model, compress(model, kind), folder / "compressed").compressed_tensors
        decompress(folder / "compressed", folder / "dense")
        arguments += [str(folder / "compressed"), str(folder / "dense" / "model.safetensors"), str(tolerance)]
    result = subprocess.run([str(python), str(SCRIPT), *arguments], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("ok ") == len(CASES[venv]), result.stdout


@pytest.mark.interop
def test_aqlm_loads_our_vq_files(interop_venvs, tmp_path):
    """transformers with the aqlm package (its QuantizedLinear: the numba kernel for 256-word
    codebooks, dequantization otherwise) loads our vq directories to our logits."""
    from safetensors.torch import save_file

    import secateurs

    python = interop_venvs / "venv-aqlm" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{python} missing: run scripts/interop_venvs.sh")
    arguments = []
    for kind in ("vq", "vq-8-8"):  # 2 x 16 words of 4 values; 2 x 256 words of 8
        model = tiny(intermediate=112)
        folder = tmp_path / kind
        saved = save_compressed(model, compress(model, kind), folder)
        assert set(saved.formats.values()) == {"vq"}
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            logits = secateurs.load(folder)(ids).logits
        save_file({"ids": ids, "logits": logits, "layers": torch.tensor(len(saved.formats))}, tmp_path / f"{kind}.safetensors")
        arguments += [str(folder), str(tmp_path / f"{kind}.safetensors"), "1e-4"]
    # aqlm's numba CPU kernel sums into each output from a parallel loop over input groups (a data
    # race with more than one thread): run it on one thread
    environment = os.environ | {"NUMBA_NUM_THREADS": "1"}
    result = subprocess.run([str(python), str(Path(__file__).with_name("aqlm_forward.py")), *arguments],
                            capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("ok ") == 2, result.stdout
