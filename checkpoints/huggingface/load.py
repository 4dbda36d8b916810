"""Hugging Face directories in: safetensors read block by block onto the mesh, the tokenizer as it is."""

import contextlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import safetensors
import tokenizers
from jax.sharding import SingleDeviceSharding

from checkpoints.huggingface.config import RUNTIME_FIELDS, model_config_from_hf, read_json
from checkpoints.huggingface.layout import hf_name, hf_shape, place
from errors import InputError
from models import registry
from parallel import mesh as mesh_lib

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _open_safetensors(file: str, stack: contextlib.ExitStack):
    try:
        return stack.enter_context(safetensors.safe_open(file, framework="numpy"))
    except (safetensors.SafetensorError, OSError) as error:
        raise InputError(f"{file} is not a readable safetensors file: {' '.join(str(error).split())}") from None


def _open_tensors(path: str, stack: contextlib.ExitStack) -> tuple[dict, str]:
    """{HF tensor name: (open safetensors file, its path)} and the file that lists them, without reading data."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    single_file = os.path.join(path, "model.safetensors")
    if os.path.isfile(index_file):
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index_file} has no weight_map")
        files, held = {}, {}
        for shard in sorted(set(weight_map.values())):
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise InputError(f"{index_file} lists the shard {shard}, which is missing from {path}")
            files[shard] = _open_safetensors(file, stack)
            held[shard] = set(files[shard].keys())
        for name, shard in weight_map.items():
            if name not in held[shard]:
                raise InputError(f"{index_file} places tensor {name} in {shard}, which does not hold it")
        return {name: (files[shard], os.path.join(path, shard)) for name, shard in weight_map.items()}, index_file
    if os.path.isfile(single_file):
        handle = _open_safetensors(single_file, stack)
        return {name: (handle, single_file) for name in handle.keys()}, single_file
    pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise InputError(f"{path} holds only PyTorch pickles ({', '.join(pickles)}); only safetensors are read: "
                         "re-save it with save_pretrained(..., safe_serialization=True)")
    raise InputError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def abstract_params(model):
    """Shapes and logical names of the model's parameters, without allocating them."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def _check_matches(path: str, model_config: ml_collections.ConfigDict) -> None:
    """Every config.model field that shapes the weights' meaning must equal the checkpoint's own."""
    if registry.parameters_of(model_config.name) != "llama":
        raise InputError(f"config.model.name={model_config.name!r}: Hugging Face checkpoints load into 'llama' (or a "
                         "family with its parameters)")
    wanted = model_config_from_hf(path)
    for key, value in wanted.items():
        scaling_only = key.startswith("rope_") and key != "rope_theta" and not wanted.rope_scaling_type
        if key in RUNTIME_FIELDS or scaling_only or model_config.get(key) == value:
            continue
        raise InputError(f"config.model.{key}={model_config.get(key)!r} does not match {path}/config.json, which "
                         f"implies {value!r}; set --config.model.{key}={value}")


def load_hf_params(path: str, model_config: ml_collections.ConfigDict, shardings=None):
    """The decoder's parameters (float32) from PATH's safetensors, placed tensor by tensor.

    `shardings` is a tree of NamedShardings matching the parameters (`parallel.mesh.sharded_abstract_params`). Each
    device's block of each tensor is read from disk on its own, so a device never holds more than its shard and a
    host reads only its own devices' blocks. Without `shardings` the parameters go to the first device.
    """
    _check_matches(path, model_config)
    abstract = mesh_lib.strip_logical_names(abstract_params(registry.build(model_config)))
    if shardings is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract)
    with contextlib.ExitStack() as stack:
        tensors, listing = _open_tensors(path, stack)

        # Check every name, dtype and shape from the headers before reading any data.
        plan = {}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
            key = jax.tree_util.keystr(key_path, simple=True, separator="/")
            name, layout = hf_name(key)
            if name not in tensors:
                raise InputError(f"{listing} has no tensor {name} (decodelab parameter {key})")
            handle, file = tensors[name]
            tensor = handle.get_slice(name)
            if tensor.get_dtype() not in _FLOAT_DTYPES:
                raise InputError(f"{file}: tensor {name} has dtype {tensor.get_dtype()}; only "
                                 f"{', '.join(_FLOAT_DTYPES)} weights are read")
            shape, expected = tuple(tensor.get_shape()), hf_shape(leaf.shape, layout)
            if shape != expected:
                raise InputError(f"{file}: tensor {name} has shape {shape} but {path}/config.json implies {expected}")
            plan[key] = tensor, layout
        ignored = {"lm_head.weight"} if model_config.tie_embeddings else set()  # some tied checkpoints keep a copy
        unused = sorted(name for name in set(tensors) - {hf_name(key)[0] for key in plan} - ignored
                        if not name.endswith("rotary_emb.inv_freq"))
        if unused:
            raise InputError(f"{listing}: tensor {unused[0]} (and {len(unused) - 1} more) has no place in the "
                             f"decoder that {path}/config.json describes")

        return place(plan, abstract, shardings)


def load_tokenizer(file: str, vocab_size: int) -> tokenizers.Tokenizer:
    """A tokenizer.json as is; it may not have more tokens than the model has embeddings."""
    if not os.path.isfile(file):
        raise InputError(f"{file} not found: the tokenizer is read from tokenizer.json (the `tokenizers` format)")
    tokenizer = tokenizers.Tokenizer.from_file(file)
    if tokenizer.get_vocab_size() > vocab_size:
        raise InputError(f"{file} has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                         f"{vocab_size}; the tokenizer does not belong to these weights")
    return tokenizer


def load(path: str, *, dtype: str = "float32", softmax_implementation: str = "xla", mesh=None, rules=None):
    """(model, params, tokenizer) from a Hugging Face directory.

    With a `mesh`, parameters are sharded by the logical-axis `rules` (default: parallel.mesh.LOGICAL_AXIS_RULES).
    """
    model_config = model_config_from_hf(path)
    model_config.update(dtype=dtype, softmax_implementation=softmax_implementation)
    model = registry.build(model_config)
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer.json"), model_config.vocab_size)
    rules = mesh_lib.LOGICAL_AXIS_RULES if rules is None else tuple(map(tuple, rules))
    shardings = None if mesh is None else mesh_lib.sharded_abstract_params(model, mesh, rules)[1]
    return model, load_hf_params(path, model_config, shardings), tokenizer
