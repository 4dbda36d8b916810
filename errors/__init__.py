"""The exception types for bad user input and for runs that cannot go on, and the checks that raise them.

Entrypoints catch these and print the message as a single line, so every message must name what is wrong: the
config key (or argument), the value, and what would be accepted instead.
"""


class InputError(ValueError):
    """Raised for input a user can fix; its message is shown as one line, with no traceback."""


class TrainingDiverged(RuntimeError):
    """Raised when a loss or norm stops being finite; its message names the step and the last good checkpoint."""
