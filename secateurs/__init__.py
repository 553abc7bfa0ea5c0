"""secateurs: one-shot compression of transformer models, and a CPU runtime that runs them faster.

    import secateurs
    result = secateurs.oneshot("smollm2-135m", "sparsegpt-50", output_dir="out/smol-50")
    model = secateurs.load("out/smol-50")

Importing the package is cheap (torch loads on first use); it also lets transformers'
`AutoModelForCausalLM.from_pretrained` read the compressed directories it writes.
"""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def oneshot(model, recipe="sparsegpt-50", calibration="austen-calib", output_dir=None, **options):
    """Compress a model in one shot; see secateurs.api.oneshot for every option."""
    from secateurs.api import oneshot as run

    return run(model, recipe, calibration, output_dir, **options)


def load(path, verify=None):
    """A model directory as a model (compressed layers as secateurs.runtime modules); see
    secateurs.api.load."""
    from secateurs.api import load as load_path

    return load_path(path, verify)


# --- transformers reads our compressed directories (secateurs.formats.hf_loading) --------------
# Registering imports transformers, which this package otherwise loads only when used: the
# registration waits for transformers' quantizer table to be imported, or runs now if it was.
_QUANTIZER_TABLE = "transformers.quantizers.auto"


def _register_with_transformers() -> None:
    from secateurs.formats.hf_loading import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _QUANTIZER_TABLE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _register_with_transformers()

            spec.loader.exec_module = exec_module
        return spec


if _QUANTIZER_TABLE in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
