"""Evaluators are named by config: `evaluators/<name>.py` holds a class `Evaluator` and a function `validate`.

  evaluator = Evaluator(section, context)   # once: builds its batches, prompts, samplers
  results = evaluator.run(params)            # a JSON-able dict, as often as wanted (train.py: every N steps)
  evaluator.report(results)                  # prints a summary (evaluate.py)
  validate(section, config)                  # checks config.evaluate.<name> at start, before anything is built

evaluate.py runs the evaluators listed in config.evaluate.run, train.py those in config.train.evaluators every
config.train.evaluate_every steps; each reads its settings from config.evaluate.<name>. A fork adds an evaluator by
adding a file and a config section; nothing here changes.
"""

import dataclasses
import importlib
import pkgutil

import ml_collections

import evaluators
from errors import InputError


@dataclasses.dataclass(frozen=True)
class Context:
    """What every evaluator may use besides the parameters it is run on."""

    config: ml_collections.ConfigDict
    workdir: str
    model: object
    tokenizer: object
    sources: dict  # split name -> random-access data source (data/corpus.py)
    mesh: object
    rules: tuple


def available() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(evaluators.__path__))


def _module(name: str):
    if name not in available():
        raise InputError(f"evaluator {name!r} does not exist; available: {', '.join(available())}")
    return importlib.import_module(f"evaluators.{name}")


def validate(names, config: ml_collections.ConfigDict, key: str) -> None:
    """Each of `names` (the config value at `key`) names an evaluator, and its section is valid."""
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise InputError(f"{key}={names!r} must be a tuple of evaluator names; available: {', '.join(available())}")
    for name in names:
        if name not in available():
            raise InputError(f"{key} lists {name!r}, which is not an evaluator; available: {', '.join(available())}")
        if name not in config.evaluate:
            raise InputError(f"{key} lists {name!r} but config.evaluate.{name} (its settings) is missing")
        _module(name).validate(config.evaluate[name], config)


def build(name: str, context: Context):
    return _module(name).Evaluator(context.config.evaluate[name], context)


def scalars(results: dict, prefix: str) -> dict[str, float]:
    """The numbers in nested results as flat {"prefix/key/...": value}, for the metrics stream."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = float(value)
    return flat
