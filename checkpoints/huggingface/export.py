"""The decoder's parameters out, as a directory that transformers' AutoModelForCausalLM.from_pretrained loads."""

import json
import os
import shutil

import jax
import ml_collections
import ml_dtypes
import numpy as np
import safetensors.numpy

from checkpoints.huggingface.config import config_json
from checkpoints.huggingface.layout import hf_name, to_hf
from checkpoints.huggingface.load import load_tokenizer
from errors import InputError
from parallel import mesh as mesh_lib

_EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def export_hf(params, model_config: ml_collections.ConfigDict, tokenizer_path: str | None, out_dir: str,
              dtype: str = "float32") -> str:
    """Writes OUT_DIR/{config.json, model.safetensors, tokenizer.json} for AutoModelForCausalLM.from_pretrained
    (without tokenizer.json when tokenizer_path is None)."""
    if dtype not in _EXPORT_DTYPES:
        raise InputError(f"export dtype {dtype!r} is not supported; choose one of {', '.join(_EXPORT_DTYPES)}")
    hf_config = config_json(model_config, dtype)
    if tokenizer_path is not None:
        load_tokenizer(tokenizer_path, model_config.vocab_size)
    tensors = {}
    params = mesh_lib.strip_logical_names(params)
    for key_path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, layout = hf_name(jax.tree_util.keystr(key_path, simple=True, separator="/"))
        host = np.asarray(jax.device_get(value), np.float32)
        tensors[name] = np.ascontiguousarray(to_hf(host, layout)).astype(_EXPORT_DTYPES[dtype])
    os.makedirs(out_dir, exist_ok=True)
    # transformers refuses safetensors files whose metadata does not name a framework it knows.
    safetensors.numpy.save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)  # so AutoTokenizer finds tokenizer.json
    return out_dir
