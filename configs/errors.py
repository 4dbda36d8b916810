"""The one exception type for bad user input (a config value, a path, a checkpoint).

Entrypoints catch it and print its message as a single line, so every message must name what is wrong:
the config key, the path or the shape, and what would be accepted instead.
"""


class InputError(ValueError):
    """Raised for input a user can fix; its message is shown as one line, with no traceback."""


class TrainingDiverged(RuntimeError):
    """Raised when a loss or norm stops being finite; its message names the step and the last good checkpoint."""
