"""Flag parsing for the entrypoints: a bad flag, config key or input is one line on stderr, never a traceback."""

import re
import sys
from typing import Callable

from absl import flags
from ml_collections import config_flags

from errors import InputError, TrainingDiverged

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file and preset, e.g. configs/lm.py:tiny; override values with --config.a.b=v.",
    lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, the tokenizer, metrics and results.")


def _one_line(error: Exception, argv: list[str]) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, (AttributeError, KeyError)) and lines:
        # A locked ConfigDict rejects an unknown key as "'key'" plus maybe 'Did you mean "other"': name the flag.
        key = re.search(r"'(\w+)", str(error)).group(1)
        flag = next((arg.split("=")[0] for arg in argv if arg.startswith("--config.") and
                     key in arg.split("=")[0].split(".")), f"--config.{key}")
        suggestion = re.search(r'Did you mean "(\w+)"', str(error))
        return f"unknown config key {flag}" + (f" (did you mean {suggestion.group(1)}?)" if suggestion else "")
    if isinstance(error, OSError):
        return f"cannot load --config: {lines[-1]}"
    return lines[-1] if lines else type(error).__name__


def main(run: Callable[[], object], argv: list[str] | None = None) -> None:
    """Parses flags, then calls `run`; a flag error, an InputError or a diverged run exits 2 with one line."""
    argv = sys.argv if argv is None else argv
    try:
        flags.FLAGS(argv)
        if CONFIG.value is None or WORKDIR.value is None:
            raise InputError("both --config=FILE:PRESET and --workdir=DIR are required")
        CONFIG.value.keys()  # a config file that failed to load raises only when first read

    except (flags.Error, AttributeError, KeyError, OSError, InputError) as error:
        _exit(_one_line(error, argv))
    try:
        run()
    except (InputError, TrainingDiverged) as error:
        _exit(str(error))


def _exit(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)
