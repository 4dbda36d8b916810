"""Models are looked up by `config.model.name`: a module `models/<name>.py` with `Config` and `Model`.

A fork adds a model by adding a file; nothing here changes.
"""

import dataclasses
import importlib
import pkgutil

import ml_collections

import models
from errors import InputError


def available() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(models.__path__)
                  if hasattr(importlib.import_module(f"models.{info.name}"), "Model"))


def build(model_config: ml_collections.ConfigDict):
    """The Linen module named by `model_config.name`, configured by the other fields."""
    try:
        module = importlib.import_module(f"models.{model_config.name}")
    except ModuleNotFoundError:
        module = None
    if not hasattr(module, "Model"):
        raise InputError(f"config.model.name={model_config.name!r} is not a model; available: {', '.join(available())}")
    fields = {key: value for key, value in model_config.items() if key != "name"}
    known = {field.name for field in dataclasses.fields(module.Config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InputError(f"config.model.{unknown[0]} is not a field of models.{model_config.name}.Config")
    return module.Model(module.Config(**fields))
