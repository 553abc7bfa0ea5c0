"""What every command shares: the --quiet/--verbose state, progress notes, argument checks."""

from __future__ import annotations

import sys

from secateurs.errors import SecateursError

VERBOSITY = {"quiet": False, "verbose": False}


def say(message: str) -> None:
    """A progress message on stderr, unless --quiet."""
    if not VERBOSITY["quiet"]:
        print(message, file=sys.stderr, flush=True)


def positive(name: str, value: int) -> int:
    if value < 1:
        raise SecateursError(f"{name} must be a positive integer (got {value})")
    return value


def load_model_for_running(name: str, vq_integer: bool = False):
    """load_any(name) in eval mode; with vq_integer its vq layers on int8 codebooks and activations
    (a one-line error where it has none that can)."""
    from secateurs.api import load_any

    loaded = load_any(name)
    loaded.model.eval()
    if vq_integer:
        from secateurs.runtime import use_integer_vq

        if not use_integer_vq(loaded.model):
            raise SecateursError(f"--vq-integer: {name} has no vq layer with an integer kernel "
                                 "(groups of 8, up to 256 codewords and 4 codebooks)")
    return loaded
