"""`config.init_from`: start a run (train.py) or an evaluation (evaluate.py) from another checkpoint format.

  ""             nothing: a workdir checkpoint or a fresh initialisation
  "hf:DIR"       a Hugging Face directory (checkpoints/huggingface/)
  "gguf:FILE"    a llama.cpp GGUF file (checkpoints/gguf.py)
  "workdir:DIR"  the latest checkpoint of another run's workdir (its parameters only; e.g. a fine-tuning run)

The model's architecture fields and the tokenizer come from the checkpoint, so no other flag is needed; runtime
fields (implementations, dtype, remat, max_seq_len) stay the config's. A workdir checkpoint records no config, so
its architecture is the config's, checked against the saved shapes. The tokenizer is kept in the workdir
(data/tokenizer.py), and the workdir's own checkpoints take precedence once it has some. Nothing is written here.
"""

import os

import jax
import ml_collections

from checkpoints import gguf, huggingface
from checkpoints.manager import Checkpoints
from errors import InputError
from models import registry
from parallel import mesh as mesh_lib


def _workdir_params(path: str, model_config: ml_collections.ConfigDict, shardings=None):
    model = registry.build(model_config)
    abstract = mesh_lib.strip_logical_names(jax.eval_shape(
        lambda: model.init(jax.random.key(0), *model.example_inputs())["params"]))
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    checkpoints = Checkpoints(path)
    try:
        return checkpoints.restore_params(abstract)
    finally:
        checkpoints.close()


FORMATS = {  # kind -> (the model fields the checkpoint implies, its parameters onto shardings, its tokenizer file)
    "hf": (huggingface.model_config_from_hf, huggingface.load_hf_params,
           lambda path: os.path.join(path, "tokenizer.json")),
    "gguf": (gguf.model_config_fields, gguf.load_params, lambda path: path),
    "workdir": (lambda path: {}, _workdir_params, lambda path: os.path.join(path, "tokenizer.json")),
}


def resolve(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, str]:
    """(the config to run, config.init_from or ""): with init_from set, a copy whose model is the checkpoint's
    and whose tokenizer is the checkpoint's unless config.data.tokenizer_path is given."""
    if not config.init_from:
        return config, ""
    kind, _, path = config.init_from.partition(":")
    exists = os.path.isfile(path) if kind == "gguf" else os.path.isdir(path)
    if kind not in FORMATS or not exists:
        raise InputError(f"config.init_from={config.init_from!r} must be '', 'hf:DIR' with DIR a Hugging Face "
                         "checkpoint directory, 'gguf:FILE' with FILE a llama.cpp GGUF file, or 'workdir:DIR' with DIR "
                         "a training run's workdir")
    model_fields, _, tokenizer_file = FORMATS[kind]
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in model_fields(path).items():
        if key not in huggingface.RUNTIME_FIELDS:
            config.model[key] = value
    if not config.data.tokenizer_path:
        config.data.tokenizer_path = tokenizer_file(path)
    return config, config.init_from


def load_params(init_from: str, model_config: ml_collections.ConfigDict, shardings):
    """The checkpoint's parameters (float32), each device's block read and placed on its own."""
    kind, _, path = init_from.partition(":")
    return FORMATS[kind][1](path, model_config, shardings)
