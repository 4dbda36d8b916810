"""Models are looked up by `config.model.name`: a module `models/<name>.py` with `Config` and `Model`.

`Config` is a frozen dataclass of the config.model fields that checks them when built (one-line InputErrors naming
config.model.<field>). `Model` is a Linen module that fulfils the contract train.py, evaluate.py, the decode engine
and the checkpoint code rely on, and nothing else about a family is read outside its module:

  model.example_inputs(batch_size, seq_len)  arguments of model.init (and of abstract evaluation or lowering)
  model.loss(params, batch, rng)             (scalar loss, {name: scalar metric}) on a batch of the data pipeline
  model.batch_format                         the batches loss reads: "text" (data/pipeline.py),
                                             "jacobi_trajectories" (data/jacobi_trajectories.py) or
                                             "shapes_images" (data/image_pipeline.py)
  model.flops_per_token(seq_len)             training FLOPs per token, for MFU
  model.init_cache(batch, cache_len, rollback_window)  an empty models.cache.Cache
  model.decode_params(params)               the parameters as decoding runs them, computed once by the engine
                                            (e.g. MatryoshkaKV's fixed bases); often `params` itself
  model.apply({"params": p}, inputs, cache, num_new_B, logits_at_B=...)  (decode outputs, cache) for the engine

A family may set `PARAMETERS = "<family>"` in its module when its parameters are another family's (the same
weights under another loss, e.g. models/cllm.py): checkpoints of that family (Hugging Face, GGUF, workdirs) then
load into it. A fork adds a model family by adding a file (and a config); nothing here changes.
"""

import dataclasses
import importlib
import pkgutil

import ml_collections

import models
from errors import InputError

CONTRACT = ("example_inputs", "loss", "batch_format", "flops_per_token", "init_cache", "decode_params")


def available() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(models.__path__)
                  if hasattr(importlib.import_module(f"models.{info.name}"), "Model"))


def parameters_of(name: str) -> str:
    """The family whose parameters model family `name` has: its module's PARAMETERS, else itself."""
    try:
        return getattr(importlib.import_module(f"models.{name}"), "PARAMETERS", name)
    except ModuleNotFoundError:
        return name


def build(model_config: ml_collections.ConfigDict):
    """The Linen module named by `model_config.name`, configured (and checked) by the other fields."""
    try:
        module = importlib.import_module(f"models.{model_config.name}")
    except ModuleNotFoundError:
        module = None
    if not hasattr(module, "Model"):
        raise InputError(f"config.model.name={model_config.name!r} is not a model; available: {', '.join(available())}")
    missing = [method for method in CONTRACT if not hasattr(module.Model, method)]
    if missing:
        raise InputError(f"models.{model_config.name}.Model lacks {', '.join(missing)} of the model contract "
                         "(models/registry.py)")
    fields = {key: value for key, value in model_config.items() if key != "name"}
    known = {field.name: field for field in dataclasses.fields(module.Config)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise InputError(f"config.model.{unknown[0]} is not a field of models.{model_config.name}.Config")
    required = [name for name, field in known.items() if name not in fields
                and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    if required:
        raise InputError(f"config.model.{required[0]} is required by models.{model_config.name}.Config")
    return module.Model(module.Config(**fields))
