"""Hugging Face checkpoints in and out: Llama 2/3, Mistral, Qwen2 and Qwen3 directories <-> the `llama` decoder.

A checkpoint is a local directory: config.json, model.safetensors (or model.safetensors.index.json and its shards)
and tokenizer.json. Only safetensors are read, never pickles; nothing downloads.

  from checkpoints import huggingface
  model, params, tokenizer = huggingface.load("/models/Llama-3.2-1B", dtype="bfloat16")
  prompt_BT = jnp.asarray([tokenizer.encode("def fib(n):").ids])
  cache = model.init_cache(batch_size=1, cache_len=256)
  logits_BTV, cache = model.apply({"params": params}, prompt_BT, cache)                 # prefill
  next_B1 = jnp.argmax(logits_BTV[:, -1:], axis=-1)
  logits_B1V, cache = model.apply({"params": params}, next_B1, cache)                   # one decode step

  # Sharded onto a mesh, each device reading only its own slice of every tensor:
  model, params, tokenizer = huggingface.load(path, mesh=mesh, rules=config.logical_axis_rules)

  # Back to a directory that transformers' AutoModelForCausalLM.from_pretrained loads:
  huggingface.export_hf(params, config.model, "WORKDIR/tokenizer.json", "/tmp/out")

Limitation: sliding-window attention (Mistral v0.1, Qwen with use_sliding_window) is not implemented, so for such
checkpoints `max_seq_len` is capped at the window, where full and windowed attention agree.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers
from jax.sharding import SingleDeviceSharding

from errors import InputError
from models import llama, registry
from parallel import mesh as mesh_lib

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Fields that only choose how the model runs, not what the checkpoint holds.
RUNTIME_FIELDS = ("name", "softmax_implementation", "lightning_implementation", "lightning_decode_implementation",
                  "lightning_block_size", "dtype", "remat", "max_seq_len")


# ---------------------------------------------------------------------------------------------------------------
# config.json <-> config.model
# ---------------------------------------------------------------------------------------------------------------

def _read_json(file: str) -> dict:
    if not os.path.isfile(file):
        raise InputError(f"{file} not found: a Hugging Face checkpoint directory needs it")
    with open(file) as f:
        return json.load(f)


def _architecture(hf: dict, file: str) -> str:
    names = hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type"))]
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise InputError(f"{file} architectures={names} (model_type={hf.get('model_type')!r}) is not supported; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    return names[0]


def _rope(hf: dict, file: str) -> dict:
    """theta and llama3 scaling from either layout: transformers 5's `rope_parameters`, or `rope_theta` +
    `rope_scaling` before it."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return dict(rope_theta=float(theta), rope_scaling_type="")
    if kind != "llama3":
        raise InputError(f"{file} rope type {kind!r} is not supported; supported: 'default', 'llama3'")
    try:
        return dict(rope_theta=float(theta), rope_scaling_type="llama3", rope_scaling_factor=float(rope["factor"]),
                    rope_low_freq_factor=float(rope["low_freq_factor"]),
                    rope_high_freq_factor=float(rope["high_freq_factor"]),
                    rope_original_max_len=int(rope["original_max_position_embeddings"]))
    except KeyError as missing:
        raise InputError(f"{file} llama3 rope scaling lacks {missing.args[0]}") from None


def llama_defaults() -> dict:
    """config.model of the `llama` decoder with every field at its default (the architecture fields still to set)."""
    return dict(name="llama", **{field.name: field.default for field in dataclasses.fields(llama.Config)
                                 if field.default is not dataclasses.MISSING})


def model_config_from_hf(path: str) -> ml_collections.ConfigDict:
    """The `config.model` section (name "llama") that matches PATH/config.json."""
    file = os.path.join(path, "config.json")
    hf = _read_json(file)
    architecture = _architecture(hf, file)
    for field, allowed in (("hidden_act", "silu"), ("mlp_bias", False)):
        if hf.get(field, allowed) != allowed:
            raise InputError(f"{file} {field}={hf[field]!r} is not supported; the decoder needs {allowed!r}")
    # Qwen2 always has q/k/v biases (and no output bias); elsewhere attention_bias adds an output bias too.
    if architecture != "Qwen2ForCausalLM" and hf.get("attention_bias", False):
        raise InputError(f"{file} attention_bias=true is not supported for {architecture}: the decoder has no "
                         "output-projection bias")
    try:
        num_heads = hf["num_attention_heads"]
        max_seq_len = hf.get("max_position_embeddings", 2048)
        window = hf.get("sliding_window")
        if window and (architecture == "MistralForCausalLM" or hf.get("use_sliding_window", False)):
            max_seq_len = min(max_seq_len, window)  # windowed and full attention agree up to the window
        model = ml_collections.ConfigDict(llama_defaults())
        model.update(
            name="llama", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
            embed_dim=hf["hidden_size"], num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads, mlp_dim=hf["intermediate_size"],
            max_seq_len=max_seq_len, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM", qk_norm=architecture == "Qwen3ForCausalLM",
            **_rope(hf, file))
    except KeyError as missing:
        raise InputError(f"{file} lacks the field {missing.args[0]}") from None
    return model


def _hf_config(model_config: ml_collections.ConfigDict, dtype: str) -> dict:
    """config.json for the transformers class whose weights are exactly the decoder's."""
    cfg = model_config
    if cfg.qkv_bias and cfg.qk_norm:
        raise InputError("config.model has both qkv_bias and qk_norm; no supported Hugging Face architecture has "
                         "exactly these weights")
    architecture, model_type = (("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else
                                ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama"))
    rope_scaling = None
    if cfg.rope_scaling_type == "llama3":
        rope_scaling = dict(rope_type="llama3", factor=cfg.rope_scaling_factor,
                            low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                            original_max_position_embeddings=cfg.rope_original_max_len)
    # The pre-transformers-5 rope layout: transformers 5 still reads it, older versions read nothing else.
    return dict(
        architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
        intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        rope_scaling=rope_scaling, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        use_sliding_window=False, sliding_window=None, torch_dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Parameter names and layouts. A decodelab tensor is its HF tensor, maybe transposed, with the fused heads axis
# (N*H) split in two; RoPE is rotate-half on both sides, so q/k need no permutation.
# ---------------------------------------------------------------------------------------------------------------

_LAYER_TENSORS = {  # decodelab path within layer_i -> (HF name within model.layers.i, layout)
    "attention/query_kernel": ("self_attn.q_proj.weight", "heads_in"),
    "attention/key_kernel": ("self_attn.k_proj.weight", "heads_in"),
    "attention/value_kernel": ("self_attn.v_proj.weight", "heads_in"),
    "attention/query_bias": ("self_attn.q_proj.bias", "heads_bias"),
    "attention/key_bias": ("self_attn.k_proj.bias", "heads_bias"),
    "attention/value_bias": ("self_attn.v_proj.bias", "heads_bias"),
    "attention/query_norm/scale": ("self_attn.q_norm.weight", "copy"),
    "attention/key_norm/scale": ("self_attn.k_norm.weight", "copy"),
    "attention/out_kernel": ("self_attn.o_proj.weight", "heads_out"),
    "attention_norm/scale": ("input_layernorm.weight", "copy"),
    "mlp_norm/scale": ("post_attention_layernorm.weight", "copy"),
    "mlp/gate/kernel": ("mlp.gate_proj.weight", "transpose"),
    "mlp/up/kernel": ("mlp.up_proj.weight", "transpose"),
    "mlp/down/kernel": ("mlp.down_proj.weight", "transpose"),
}
_TOP_TENSORS = {
    "embedding": ("model.embed_tokens.weight", "copy"),
    "final_norm/scale": ("model.norm.weight", "copy"),
    "lm_head/kernel": ("lm_head.weight", "transpose"),
}


def _hf_name(path: str) -> tuple[str, str]:
    """(HF tensor name, layout) of the decodelab parameter at `path` ("layer_0/mlp/up/kernel")."""
    if match := re.fullmatch(r"layer_(\d+)/(.+)", path):
        name, layout = _LAYER_TENSORS[match[2]]
        return f"model.layers.{match[1]}.{name}", layout
    return _TOP_TENSORS[path]


def _hf_shape(shape: tuple, layout: str) -> tuple:
    if layout == "transpose":
        return shape[::-1]
    if layout == "heads_in":  # [D, N, H] <- [N*H, D]
        return (shape[1] * shape[2], shape[0])
    if layout == "heads_out":  # [N, H, D] <- [D, N*H]
        return (shape[2], shape[0] * shape[1])
    if layout == "heads_bias":  # [N, H] <- [N*H]
        return (shape[0] * shape[1],)
    return shape


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "transpose":
        return x.T
    if layout == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if layout == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    if layout == "heads_bias":
        return x.reshape(-1)
    return x


def _read_block(tensor, layout: str, index: tuple, shape: tuple) -> np.ndarray:
    """The block `index` (slices of the decodelab shape) of a lazily opened HF tensor, reading only that block."""
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
    if layout == "copy":
        return tensor[index]
    if layout == "transpose":
        return tensor[index[1], index[0]].T
    # The fused N*H axis: read whole heads n0:n1, then select within each head.
    if layout == "heads_in":
        d, heads, within = index
        block = tensor[slice(heads.start * shape[2], heads.stop * shape[2]), d]
        return block.reshape(-1, shape[2], block.shape[-1]).transpose(2, 0, 1)[:, :, within]
    if layout == "heads_out":
        heads, within, d = index
        block = tensor[d, slice(heads.start * shape[1], heads.stop * shape[1])]
        return block.T.reshape(-1, shape[1], block.shape[0])[:, within]
    heads, within = index
    return tensor[slice(heads.start * shape[1], heads.stop * shape[1])].reshape(-1, shape[1])[:, within]


# ---------------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------------

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
        weight_map = _read_json(index_file).get("weight_map")
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
    if model_config.name != "llama":
        raise InputError(f"config.model.name={model_config.name!r}: Hugging Face checkpoints load into 'llama'")
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
            name, layout = _hf_name(key)
            if name not in tensors:
                raise InputError(f"{listing} has no tensor {name} (decodelab parameter {key})")
            handle, file = tensors[name]
            tensor = handle.get_slice(name)
            if tensor.get_dtype() not in _FLOAT_DTYPES:
                raise InputError(f"{file}: tensor {name} has dtype {tensor.get_dtype()}; only "
                                 f"{', '.join(_FLOAT_DTYPES)} weights are read")
            shape, expected = tuple(tensor.get_shape()), _hf_shape(leaf.shape, layout)
            if shape != expected:
                raise InputError(f"{file}: tensor {name} has shape {shape} but {path}/config.json implies {expected}")
            plan[key] = tensor, layout
        ignored = {"lm_head.weight"} if model_config.tie_embeddings else set()  # some tied checkpoints keep a copy
        unused = sorted(name for name in set(tensors) - {_hf_name(key)[0] for key in plan} - ignored
                        if not name.endswith("rotary_emb.inv_freq"))
        if unused:
            raise InputError(f"{listing}: tensor {unused[0]} (and {len(unused) - 1} more) has no place in the "
                             f"decoder that {path}/config.json describes")

        def place(key_path, leaf, sharding):
            tensor, layout = plan[jax.tree_util.keystr(key_path, simple=True, separator="/")]
            blocks = {}  # devices holding replicas of one block share one read

            def read(index):
                bounds = tuple(s.indices(n) for s, n in zip(index, leaf.shape))
                if bounds not in blocks:
                    blocks[bounds] = _read_block(tensor, layout, index, leaf.shape).astype(leaf.dtype)
                return blocks[bounds]

            return jax.make_array_from_callback(leaf.shape, sharding, read)

        return jax.tree_util.tree_map_with_path(place, abstract, shardings)


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


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

def export_hf(params, model_config: ml_collections.ConfigDict, tokenizer_path: str | None, out_dir: str,
              dtype: str = "float32") -> str:
    """Writes OUT_DIR/{config.json, model.safetensors, tokenizer.json} for AutoModelForCausalLM.from_pretrained
    (without tokenizer.json when tokenizer_path is None)."""
    if dtype not in _EXPORT_DTYPES:
        raise InputError(f"export dtype {dtype!r} is not supported; choose one of {', '.join(_EXPORT_DTYPES)}")
    hf_config = _hf_config(model_config, dtype)
    if tokenizer_path is not None:
        load_tokenizer(tokenizer_path, model_config.vocab_size)
    tensors = {}
    params = mesh_lib.strip_logical_names(params)
    for key_path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, layout = _hf_name(jax.tree_util.keystr(key_path, simple=True, separator="/"))
        host = np.asarray(jax.device_get(value), np.float32)
        tensors[name] = np.ascontiguousarray(_to_hf(host, layout)).astype(_EXPORT_DTYPES[dtype])
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
