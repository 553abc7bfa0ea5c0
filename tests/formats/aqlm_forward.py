"""Run inside the aqlm virtualenv (scripts/interop_venvs.sh), without secateurs: transformers with the
aqlm package loads a vq directory secateurs wrote (its aqlm quantization_config) and must reproduce
the logits secateurs computed.

    python aqlm_forward.py DIRECTORY EXPECTED.safetensors TOLERANCE [...]
"""

import sys

import torch
import transformers
from aqlm import QuantizedLinear
from safetensors.torch import load_file

arguments = sys.argv[1:]
for folder, expected_file, tolerance in zip(arguments[::3], arguments[1::3], arguments[2::3]):
    expected = load_file(expected_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    quantized = [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    assert len(quantized) == int(expected["layers"]), (len(quantized), quantized[:3])
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    error = (logits - expected["logits"]).abs().max().item()
    scale = expected["logits"].abs().max().item()
    assert error <= float(tolerance) * scale, f"{folder}: max error {error:.3g} (scale {scale:.3g})"
    print(f"ok {folder} {len(quantized)} QuantizedLinear, max error {error:.3g}")
