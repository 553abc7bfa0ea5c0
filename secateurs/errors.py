"""The exception types every layer shares; the command line turns SecateursError into one line and
exit code 2."""


class SecateursError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class FormatError(SecateursError):
    """A model file that is corrupt, truncated or inconsistent; the message names the tensor (or the
    file, or the config.json entry) at fault."""
