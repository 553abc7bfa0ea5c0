"""`transformers.AutoModelForCausalLM.from_pretrained(dir)` for our compressed directories.

transformers picks a quantizer by config.json's `quantization_config.quant_method`. Directories
whose layers compressed-tensors cannot read say "secateurs" there; those it can read say
"compressed-tensors" (for vLLM and compressed-tensors' own readers), and those whose every layer
is one vq shape say "aqlm" (for the aqlm package). We register a "secateurs" quantizer with
transformers' public hooks, and, where the compressed-tensors or aqlm package is not installed
(transformers cannot use its own quantizer then), let ours answer for those directories too, but
only those secateurs wrote.

The quantizer swaps each compressed Linear for a placeholder before the weights load (so no
weight is reported missing, and the layers' stored tensors are expected), then builds the
runtime modules from the directory's validated tensors, as secateurs.load does.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from torch import nn

from secateurs.formats.directory import read_compressed
from secateurs.formats.registry import FORMATS, LAYOUT_KEY, LayerSpec
from secateurs.formats.writing import AQLM_METHOD

QUANT_METHOD = "secateurs"


class StoredLayer(nn.Module):
    """Where a compressed Linear goes while transformers loads the other weights."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x):
        raise RuntimeError("a secateurs layer was not loaded (its quantizer's post-processing did not run)")


def register() -> None:
    """Register the quantizer and its config with transformers (idempotent)."""
    import sys

    import transformers.quantizers.auto  # noqa: F401  (already imported when the import hook calls this)
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    auto = sys.modules["transformers.quantizers.auto"]
    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return

    class SecateursConfig(QuantizationConfigMixin):
        """Nothing to configure: every layer's format is in config.json's secateurs_compression."""

        def __init__(self, **kwargs):
            self.quant_method = kwargs.pop("quant_method", QUANT_METHOD)
            self.stored = kwargs  # a compressed-tensors config secateurs wrote, kept as it is

        def to_dict(self):
            return {"quant_method": self.quant_method, **self.stored}

    class SecateursQuantizer(HfQuantizer):
        requires_calibration = False

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.folder: Path | None = None

        def validate_environment(self, *args, **kwargs):
            pass

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            layout = getattr(model.config, LAYOUT_KEY, None)
            if not isinstance(layout, dict) or not checkpoint_files:
                raise ValueError(f"config.json has quant_method {self.quantization_config.quant_method!r} but no "
                                 f"{LAYOUT_KEY}: not a directory secateurs wrote")
            self.folder = Path(checkpoint_files[0]).parent
            patterns = set(model._keys_to_ignore_on_load_unexpected or ())
            for layer, entry in layout["layers"].items():
                spec = LayerSpec.from_json(layer, entry)
                model.set_submodule(layer, StoredLayer(spec))
                suffixes = [*FORMATS[spec.format].expected_tensors(spec), "bias"]
                patterns |= {"^" + re.escape(f"{layer}.{suffix}") + "$" for suffix in suffixes}
            model._keys_to_ignore_on_load_unexpected = patterns

        def _process_model_after_weight_loading(self, model, **kwargs):
            directory = read_compressed(self.folder)
            for layer, spec in directory.specs.items():
                bias = directory.dense.get(f"{layer}.bias")
                model.set_submodule(layer, FORMATS[spec.format].module(directory.layers[layer], spec, bias))
            return model

        def is_serializable(self, **kwargs):
            return False

        @property
        def is_trainable(self):
            return False

    auto.register_quantization_config(QUANT_METHOD)(SecateursConfig)
    auto.register_quantizer(QUANT_METHOD)(SecateursQuantizer)
    for method, package in (("compressed-tensors", "compressed_tensors"), (AQLM_METHOD, "aqlm")):
        if importlib.util.find_spec(package) is None:
            # transformers' own quantizer for these cannot run without the package: answer for the
            # directories we wrote (one from elsewhere fails in _process_model_before_weight_loading).
            auto.AUTO_QUANTIZATION_CONFIG_MAPPING[method] = SecateursConfig
            auto.AUTO_QUANTIZER_MAPPING[method] = SecateursQuantizer
