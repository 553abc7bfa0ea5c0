"""Run inside a compressed-tensors virtualenv (scripts/interop_venvs.sh), not with secateurs:
decompress a secateurs compressed directory with compressed-tensors and compare every tensor of
the model with the expected dense weights.

    python ct_decompress.py COMPRESSED_DIR EXPECTED.safetensors

Prints one line per mismatch and exits 1 if any; exit 0 and "ok N tensors" when all are equal.
"""

import sys

import compressed_tensors
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM


def decompressed_state(path: str) -> dict[str, torch.Tensor]:
    if compressed_tensors.__version__.startswith("0.14."):
        # The last release with the sparse compressors: its own disk decompression entry point.
        from compressed_tensors.compressors import ModelCompressor

        compressor = ModelCompressor.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        compressor.decompress(model_path=path, model=model)
    else:
        # Current releases decompress through transformers' compressed-tensors quantizer.
        from transformers.utils.quantization_config import CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(run_compressed=False))
    return model.state_dict()


def main(path: str, expected_file: str) -> int:
    state = decompressed_state(path)
    expected = load_file(expected_file)
    bad = 0
    for name, tensor in expected.items():
        got = state.get(name)
        if got is None or got.shape != tensor.shape or not torch.equal(got.to(tensor.dtype), tensor):
            bad += 1
            print(f"mismatch {name}: {None if got is None else (got.dtype, tuple(got.shape))} vs {tensor.dtype} {tuple(tensor.shape)}")
    print(f"{'ok' if not bad else 'FAILED'} {len(expected)} tensors, compressed-tensors {compressed_tensors.__version__}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
