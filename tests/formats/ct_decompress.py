"""Run inside a compressed-tensors virtualenv (scripts/interop_venvs.sh), not with secateurs:
decompress a secateurs compressed directory with compressed-tensors and compare every tensor of
the model with the expected dense weights.

    python ct_decompress.py COMPRESSED_DIR EXPECTED.safetensors RTOL [COMPRESSED_DIR EXPECTED.safetensors RTOL ...]

RTOL 0 asks for bit-exact tensors. Prints one line per mismatch and exits 1 if any; "ok N tensors"
per directory whose tensors all match.
"""

import sys

import compressed_tensors
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM


def decompressed_state(path: str) -> dict[str, torch.Tensor]:
    if compressed_tensors.__version__.startswith("0.14."):
        # The last release with the sparse compressors. Its transformers integration cannot load
        # sparse-bitmask (it re-compresses meta tensors), so do what it would: load the plain
        # tensors, then let ModelCompressor decompress the compressed layers from disk.
        from compressed_tensors.compressors import ModelCompressor

        compressor = ModelCompressor.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        plain = {name: tensor for name, tensor in load_file(f"{path}/model.safetensors").items() if tensor.is_floating_point()}
        model.load_state_dict(plain, strict=False)
        compressor.decompress(model_path=path, model=model)
    else:
        # Current releases decompress through transformers' compressed-tensors quantizer.
        from transformers.utils.quantization_config import CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(run_compressed=False))
    return model.state_dict()


def check(path: str, expected_file: str, rtol: str) -> bool:
    state = decompressed_state(path)
    expected = load_file(expected_file)
    bad = 0
    for name, tensor in expected.items():
        got = state.get(name)
        if got is None or got.shape != tensor.shape or not torch.allclose(got.to(tensor.dtype), tensor, rtol=float(rtol), atol=0):
            bad += 1
            print(f"mismatch {path} {name}: {None if got is None else (got.dtype, tuple(got.shape))} "
                  f"vs {tensor.dtype} {tuple(tensor.shape)}")
    print(f"{'ok' if not bad else 'FAILED'} {len(expected)} tensors of {path}, compressed-tensors {compressed_tensors.__version__}")
    return not bad


def main(arguments: list[str]) -> int:
    cases = [arguments[i : i + 3] for i in range(0, len(arguments), 3)]
    return 0 if all([check(*case) for case in cases]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
