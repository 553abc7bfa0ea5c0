"""secateurs: one-shot compression of transformer models, and a CPU runtime that runs them faster."""


def load(path):
    """A model directory as a model; compressed Linear layers become secateurs.runtime modules
    (secateurs.formats.load). Imports torch on first call only, so the CLI starts fast."""
    from secateurs.formats import load as load_directory

    return load_directory(path)
