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


