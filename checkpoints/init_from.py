"""`config.init_from`: start a run (train.py) or an evaluation (evaluate.py) from another checkpoint format.

  ""         nothing: a workdir checkpoint or a fresh initialisation
  "hf:DIR"   a Hugging Face directory (checkpoints/huggingface.py)

The model's architecture fields and the tokenizer come from the checkpoint, so no other flag is needed; runtime
fields (implementations, dtype, remat, max_seq_len) stay the config's. The workdir's own checkpoints take
precedence once it has some.
"""

import os

import ml_collections

from checkpoints import huggingface
from errors import InputError

FORMATS = ("hf",)


def resolve(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, str]:
    """(the config to run, the checkpoint path or ""): with init_from set, a copy whose model is the checkpoint's
    and whose tokenizer is the checkpoint's unless config.data.tokenizer_path is given."""
    if not config.init_from:
        return config, ""
    kind, _, path = config.init_from.partition(":")
    if kind not in FORMATS or not os.path.isdir(path):
        raise InputError(f"config.init_from={config.init_from!r} must be '' or 'hf:DIR' with DIR a Hugging Face "
                         "checkpoint directory")
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in huggingface.model_config_from_hf(path).items():
        if key not in huggingface.RUNTIME_FIELDS:
            config.model[key] = value
    if not config.data.tokenizer_path:
        config.data.tokenizer_path = os.path.join(path, "tokenizer.json")
    return config, path


def load_params(path: str, model_config: ml_collections.ConfigDict, shardings):
    """The checkpoint's parameters (float32), each device's block read and placed on its own."""
    return huggingface.load_hf_params(path, model_config, shardings)
