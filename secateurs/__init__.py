"""secateurs: one-shot compression of transformer models, and a CPU runtime that runs them faster.

The functions import torch on first call only, so the command line starts fast.
"""

__version__ = "0.1.0"


def compress(model, recipe="sparsegpt-50", calibration=None, **options):
    """Compress a Hugging Face causal LM in place; `calibration` is a [samples, seqlen] tensor of
    token ids (secateurs.data.corpus.sample_windows). Returns a CompressionReport."""
    from secateurs.pipeline.engine import compress as compress_model

    return compress_model(model, recipe, calibration, **options)


def load(path):
    """A model directory as a model; compressed Linear layers become secateurs.runtime modules
    (secateurs.formats.load)."""
    from secateurs.formats import load as load_directory

    return load_directory(path)
