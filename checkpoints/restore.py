"""The parameters an evaluation (evaluate.py) or a benchmark (benchmarks/superposed.py load_model) runs with: the
workdir's latest checkpoint, else the `config.init_from` checkpoint (hf:DIR, gguf:FILE, workdir:DIR), else a fresh
initialisation where the caller allows one.

MatryoshkaKV (config.model.kv_rank > 0, models/matryoshka_kv.py) adds a `matryoshka_kv` subtree to each softmax
layer, which a checkpoint of the uncompressed model lacks: such a checkpoint is read as the uncompressed model's
(its Hugging Face / GGUF tensors, or the workdir's saved names) and the bases are taken from the file
config.model.kv_bases names (tools/matryoshka_pca.py's matryoshka_kv.npz, checked against the model's shapes).
A checkpoint that has the subtree keeps its own bases unless config.model.kv_bases is given, which then replaces
them. kv_rank > 0 with no bases anywhere is a one-line InputError.
"""

import dataclasses
import importlib

import jax
import ml_collections

from checkpoints import init_from
from checkpoints.manager import Checkpoints
from errors import InputError
from models import matryoshka_pca, registry

SUBTREE = matryoshka_pca.SUBTREE
_KV_DEFAULTS = dict(kv_rank=0, kv_key_ranks=(), kv_value_ranks=(), kv_bases="")


def uncompressed_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.model without MatryoshkaKV (the fields it has among kv_rank, kv_key_ranks, kv_value_ranks,
    kv_bases reset): the model whose checkpoints carry no bases. A family with another's parameters
    (models/registry.py PARAMETERS, e.g. models/matryoshka_distill.py, which needs kv_rank > 0) becomes that
    family, keeping only the fields its Config has."""
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    family = registry.parameters_of(model_config.name)
    if family != model_config.name:
        known = {field.name for field in dataclasses.fields(importlib.import_module(f"models.{family}").Config)}
        model_config = ml_collections.ConfigDict({key: value for key, value in model_config.items()
                                                  if key in known or key == "name"})
        model_config.name = family
    for key, value in _KV_DEFAULTS.items():
        if key in model_config:
            model_config[key] = value
    return model_config


def _bases_wanted(abstract_params) -> dict:
    """The model's MatryoshkaKV subtree, {layer_i: {attention: {matryoshka_kv: {...}}}} (empty without it)."""
    return {layer: {"attention": {SUBTREE: branch["attention"][SUBTREE]}} for layer, branch in abstract_params.items()
            if isinstance(branch, dict) and SUBTREE in branch.get("attention", {})}


def _from_workdir(checkpoints: Checkpoints, abstract_params, step=None):
    """The checkpoint's parameters; one saved without MatryoshkaKV parameters restores without them."""
    step = checkpoints.latest_step() if step is None else step
    if step is not None and _bases_wanted(abstract_params) and not any(
            f"/{SUBTREE}/" in name for name in checkpoints.parameter_shapes(step)):
        abstract_params = matryoshka_pca.base_params(abstract_params)
    return checkpoints.restore_params(abstract_params, step)  # no step: the one-line "no checkpoint" error


def params(config: ml_collections.ConfigDict, workdir: str, abstract_params, shardings=None, initialise=None):
    """(params, step, source): the parameters of the workdir's latest checkpoint (step its step, source its
    directory), else of config.init_from (step None, source config.init_from), else initialise() (source
    "fresh"; without `initialise` that is the "no checkpoint" error). `config` is init_from.resolve's;
    abstract_params are the model's (placed by `shardings` where given, parallel.mesh.sharded_abstract_params)."""
    checkpoints = Checkpoints(workdir) if workdir else None
    try:
        step = None if checkpoints is None else checkpoints.latest_step()
        kind, _, path = config.init_from.partition(":")
        if step is not None:
            restored, source = _from_workdir(checkpoints, abstract_params, step), checkpoints.directory
        elif kind == "workdir":
            other = Checkpoints(path)
            try:
                restored, source = _from_workdir(other, abstract_params), config.init_from
            finally:
                other.close()
        elif config.init_from:
            model_config, base_shardings = config.model, shardings
            if _bases_wanted(abstract_params):  # Hugging Face and GGUF files hold uncompressed models only
                model_config = uncompressed_config(config.model)
                base_shardings = None if shardings is None else matryoshka_pca.base_params(shardings)
            restored, source = init_from.load_params(config.init_from, model_config, base_shardings), config.init_from
        elif initialise is not None:
            restored, source = initialise(), "fresh"
        elif checkpoints is None:
            raise InputError("no workdir, config.init_from or initialisation to take parameters from")
        else:
            restored, source = _from_workdir(checkpoints, abstract_params), None
    finally:
        if checkpoints is not None:
            checkpoints.close()
    return with_bases(restored, config.model, abstract_params, source), step, source


def with_bases(params, model_config, abstract_params, source: str = "the restored checkpoint"):
    """params with the MatryoshkaKV subtree the model wants: from the file config.model.kv_bases where given
    (placed like abstract_params), else the parameters' own; unchanged for a model without MatryoshkaKV."""
    wanted = _bases_wanted(abstract_params)
    if not wanted:
        return params
    path = model_config.get("kv_bases", "")
    if not path:
        if all(SUBTREE in params[layer]["attention"] for layer in wanted):
            return params
        raise InputError(f"config.model.kv_rank={model_config.kv_rank} needs MatryoshkaKV bases, which the "
                         f"parameters of {source} lack; set config.model.kv_bases to the file "
                         "tools/matryoshka_pca.py writes (WORKDIR/matryoshka_kv.npz)")
    subtree = matryoshka_pca.load(path, wanted)
    subtree = jax.tree.map(lambda x, a: x if getattr(a, "sharding", None) is None else jax.device_put(x, a.sharding),
                           subtree, wanted)
    return matryoshka_pca.merged(params, subtree)
