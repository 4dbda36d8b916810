"""llama.cpp GGUF files -> the `llama` decoder: metadata to config.model, tensors dequantized to float32 and placed
on the mesh, the tokenizer rebuilt from the metadata (checkpoints/gguf_tokenizer.py).

  from checkpoints import gguf
  model, params, tokenizer = gguf.load("SmolLM2-135M-Instruct.Q4_1.gguf")
  logits_BTV, _ = model.apply({"params": params}, jnp.asarray([tokenizer.encode("def fib(n):").ids]))

  # Sharded onto a mesh, each device dequantizing only the rows of its own block of every tensor:
  model, params, tokenizer = gguf.load(path, mesh=mesh, rules=config.logical_axis_rules)

  # The pieces: config.model fields, parameters on given shardings, the tokenizer.
  config.model.update(gguf.model_config_fields(path))
  params = gguf.load_params(path, config.model, shardings)
  tokenizer = gguf.tokenizer(path)

  # --config.init_from=gguf:PATH (checkpoints/init_from.py) takes model_config_fields and load_params, and the
  # run keeps the rebuilt tokenizer as WORKDIR/tokenizer.json (data/tokenizer.py).

Supported: the `llama` architecture (Llama 2/3, SmolLM, Mistral converted as llama) with tensors in the
QUANT_TYPES below, dequantized by gguf-py's numpy kernels. Its tensors are the Hugging Face tensors of the same
model ([out, in] in numpy order) but for one change: llama.cpp rotates adjacent pairs, so its converter interleaves
the two rotary halves of every query and key head, and that row permutation is undone here. Names and layouts are
otherwise the Hugging Face loader's. Llama 3.1+ rope scaling is read from the `rope_freqs.weight` tensor that
llama.cpp's converter writes in its place.
"""

import dataclasses
import os
import re

import jax
import ml_collections
import numpy as np
import tokenizers
from gguf import GGMLQuantizationType, GGUFReader, quants
from jax.sharding import SingleDeviceSharding

from checkpoints import gguf_tokenizer, huggingface
from checkpoints.huggingface import layout as hf_layout
from checkpoints.huggingface.config import llama_defaults
from errors import InputError
from models import registry
from models.rope import inverse_frequencies
from parallel import mesh as mesh_lib

ARCHITECTURES = ("llama",)
QUANT_TYPES = tuple(GGMLQuantizationType[name] for name in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
_MAGIC = b"GGUF"
# Llama 3.1 and 3.2 scale rope with these; a file's rope_freqs.weight must match them (with its own factor).
_LLAMA3_SCALING = dict(rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192)


# ---------------------------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _File:
    path: str
    metadata: dict  # key -> Python value (str, int, float, bool or a list of them)
    tensors: dict  # GGUF tensor name -> gguf ReaderTensor, its data a memory map of the file


def _open(path: str) -> _File:
    if not os.path.isfile(path):
        raise InputError(f"{path} not found: a GGUF checkpoint is one .gguf file")
    with open(path, "rb") as f:
        head = f.read(len(_MAGIC))
    if head != _MAGIC:
        raise InputError(f"{path} is not a GGUF file: it starts with {head!r}, not {_MAGIC!r}")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError) as error:  # gguf-py's for a header, tensor table or tensor cut short
        raise InputError(f"{path} ({os.path.getsize(path)} bytes) is truncated, corrupt or newer than gguf-py "
                         f"reads: {' '.join(str(error).split())}") from None
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    return _File(path, metadata, {t.name: t for t in reader.tensors})


def _required(file: _File, key: str):
    if key not in file.metadata:
        raise InputError(f"{file.path} lacks the metadata key {key}")
    return file.metadata[key]


def _float32(value) -> float:
    """The shortest decimal that is this float32 (GGUF stores floats in 32 bits): 1e-05, not 9.999999747e-06."""
    return float(str(np.float32(value)))


# ---------------------------------------------------------------------------------------------------------------
# Metadata -> config.model
# ---------------------------------------------------------------------------------------------------------------

def _config_fields(file: _File) -> dict:
    architecture = file.metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise InputError(f"{file.path}: general.architecture={architecture!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    key = lambda name: f"{architecture}.{name}"
    if file.metadata.get(key("expert_count"), 0):
        raise InputError(f"{file.path}: {key('expert_count')}={file.metadata[key('expert_count')]} (a mixture of "
                         "experts) is not supported; the decoder has one MLP per layer")
    if "token_embd.weight" not in file.tensors:
        raise InputError(f"{file.path} has no tensor token_embd.weight")
    embed_dim, num_heads = _required(file, key("embedding_length")), _required(file, key("attention.head_count"))
    num_kv_heads = file.metadata.get(key("attention.head_count_kv"), num_heads)
    if not isinstance(num_kv_heads, int):
        raise InputError(f"{file.path}: {key('attention.head_count_kv')}={num_kv_heads} varies per layer; the "
                         "decoder needs one value")
    head_dim = file.metadata.get(key("attention.key_length"), embed_dim // num_heads)
    for name in ("attention.value_length", "rope.dimension_count"):  # the decoder rotates and attends whole heads
        if file.metadata.get(key(name), head_dim) != head_dim:
            raise InputError(f"{file.path}: {key(name)}={file.metadata[key(name)]} differs from the head size "
                             f"{head_dim}; the decoder needs them equal")
    theta = _float32(file.metadata.get(key("rope.freq_base"), 10_000.0))
    return dict(
        # The embedding's rows, not llama.vocab_size: they are what the weights hold.
        vocab_size=int(file.tensors["token_embd.weight"].shape[-1]),
        num_layers=_required(file, key("block_count")),
        embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        mlp_dim=_required(file, key("feed_forward_length")),
        max_seq_len=_required(file, key("context_length")),
        rope_theta=theta, **_rope_scaling(file, key("rope.scaling.type"), head_dim, theta),
        norm_eps=_float32(_required(file, key("attention.layer_norm_rms_epsilon"))),
        tie_embeddings="output.weight" not in file.tensors,  # llama.cpp ties exactly when the file has no output
        qkv_bias="blk.0.attn_q.bias" in file.tensors,
        qk_norm=False)


def _rope_scaling(file: _File, type_key: str, head_dim: int, theta: float) -> dict:
    """No scaling, or Llama 3's, whose per-frequency divisors llama.cpp's converter stores as rope_freqs.weight."""
    scaling = file.metadata.get(type_key, "none")
    if scaling != "none":
        raise InputError(f"{file.path}: {type_key}={scaling!r} is not supported; supported: 'none', or Llama 3 "
                         "scaling given as rope_freqs.weight")
    if "rope_freqs.weight" not in file.tensors:
        return dict(rope_scaling_type="")
    divisors_F = quants.dequantize(file.tensors["rope_freqs.weight"].data,
                                   file.tensors["rope_freqs.weight"].tensor_type).reshape(-1)
    fields = dict(rope_scaling_type="llama3", rope_scaling_factor=float(divisors_F.max()), **_LLAMA3_SCALING)
    expected_F = inverse_frequencies(head_dim, theta) / inverse_frequencies(
        head_dim, theta, "llama3", fields["rope_scaling_factor"], fields["rope_low_freq_factor"],
        fields["rope_high_freq_factor"], fields["rope_original_max_len"])
    if divisors_F.shape != expected_F.shape or not np.allclose(divisors_F, expected_F, rtol=1e-4):
        raise InputError(f"{file.path}: rope_freqs.weight is not Llama 3 rope scaling with "
                         f"{', '.join(f'{k}={v}' for k, v in _LLAMA3_SCALING.items())}; no other is supported")
    return fields


def model_config_fields(path: str) -> dict:
    """The architecture fields of config.model (models/llama.py Config names) that PATH's metadata implies."""
    return _config_fields(_open(path))


def _model_config(fields: dict) -> ml_collections.ConfigDict:
    model_config = ml_collections.ConfigDict(llama_defaults())
    model_config.update(fields)
    return model_config


def _check_matches(file: _File, model_config: ml_collections.ConfigDict) -> None:
    """Every config.model field that shapes the weights' meaning must equal the file's own."""
    if registry.parameters_of(model_config.name) != "llama":
        raise InputError(f"config.model.name={model_config.name!r}: GGUF checkpoints load into 'llama' (or a family "
                         "with its parameters)")
    wanted = _config_fields(file)
    for key, value in wanted.items():
        if key == "max_seq_len" or model_config.get(key) == value:  # max_seq_len only bounds what is asked for
            continue
        raise InputError(f"config.model.{key}={model_config.get(key)!r} does not match {file.path}, which "
                         f"implies {value!r}; set --config.model.{key}={value}")


# ---------------------------------------------------------------------------------------------------------------
# Tensors -> parameters
# ---------------------------------------------------------------------------------------------------------------

_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_LAYER_NAMES = {  # Hugging Face module within model.layers.i -> GGUF tensor within blk.i
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if match := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name):
        return f"blk.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"
    return _TOP_NAMES[hf_name]


class _HFView:
    """One GGUF tensor indexed as its Hugging Face array (numpy [out, in], rotary halves not interleaved).

    Indexing dequantizes only the rows asked for: quantization blocks run along rows. `heads_of` is the head size
    for the query and key tensors, whose rows llama.cpp permutes within each head; the Hugging Face loader's
    layouts read those a whole number of heads at a time.
    """

    def __init__(self, tensor, heads_of: int = 0):
        self.tensor, self.heads_of = tensor, heads_of

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        data = self.tensor.data
        if data.ndim == 1:  # norms and biases: small, read whole
            return self._unpermuted(quants.dequantize(data, self.tensor.tensor_type).reshape(-1))[index]
        rows = self._unpermuted(quants.dequantize(data[index[0]], self.tensor.tensor_type))
        return rows[(slice(None),) + index[1:]]

    def _unpermuted(self, rows_R):
        """llama.cpp's row 2j + h of each head is row h * H/2 + j of Hugging Face's (h: which half)."""
        if not self.heads_of:
            return rows_R
        H = self.heads_of
        return rows_R.reshape(-1, H // 2, 2, *rows_R.shape[1:]).swapaxes(1, 2).reshape(rows_R.shape)


def _plan(file: _File, abstract, model_config) -> dict:
    """{decodelab parameter path: (HF view of its GGUF tensor, layout)}, every name, type and shape checked
    without reading data."""
    plan = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        key = jax.tree_util.keystr(key_path, simple=True, separator="/")
        hf_name, layout = hf_layout.hf_name(key)
        name = _gguf_name(hf_name)
        if name not in file.tensors:
            raise InputError(f"{file.path} has no tensor {name} (decodelab parameter {key})")
        tensor = file.tensors[name]
        if tensor.tensor_type not in QUANT_TYPES:
            raise InputError(f"{file.path}: tensor {name} is {tensor.tensor_type.name}, which is not supported; "
                             f"supported: {', '.join(t.name for t in QUANT_TYPES)}")
        shape, expected = tuple(int(n) for n in reversed(tensor.shape)), hf_layout.hf_shape(leaf.shape, layout)
        if shape != expected:
            raise InputError(f"{file.path}: tensor {name} has shape {shape} (numpy order) but its metadata implies "
                             f"{expected}")
        rotary = re.search(r"\.attn_[qk]\.", name) is not None
        plan[key] = _HFView(tensor, model_config.head_dim if rotary else 0), layout
    used = {_gguf_name(hf_layout.hf_name(key)[0]) for key in plan}
    if model_config.rope_scaling_type:
        used.add("rope_freqs.weight")
    unused = sorted(set(file.tensors) - used)
    if unused:
        raise InputError(f"{file.path}: tensor {unused[0]} (and {len(unused) - 1} more) has no place in the decoder "
                         "its metadata describes")
    return plan


def _load_params(file: _File, model_config: ml_collections.ConfigDict, shardings=None):
    _check_matches(file, model_config)
    abstract = mesh_lib.strip_logical_names(huggingface.abstract_params(registry.build(model_config)))
    if shardings is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract)
    return hf_layout.place(_plan(file, abstract, model_config), abstract, shardings)


def load_params(path: str, model_config: ml_collections.ConfigDict, shardings=None):
    """The decoder's parameters (float32) from PATH, placed tensor by tensor.

    `shardings` is a tree of NamedShardings matching the parameters (`parallel.mesh.sharded_abstract_params`).
    Each device's block is dequantized from the memory-mapped file on its own, so a device never holds more than
    its shard. Without `shardings` the parameters go to the first device.
    """
    return _load_params(_open(path), model_config, shardings)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer, and everything at once
# ---------------------------------------------------------------------------------------------------------------

def tokenizer(path: str) -> tokenizers.Tokenizer:
    """The byte-level BPE tokenizer PATH's metadata describes (checkpoints/gguf_tokenizer.py)."""
    return gguf_tokenizer.from_metadata(_open(path).metadata, path)


def _tokenizer(file: _File, vocab_size: int) -> tokenizers.Tokenizer:
    """The tokenizer, which may not have more tokens than the model has embeddings."""
    tokenizer = gguf_tokenizer.from_metadata(file.metadata, file.path)
    if tokenizer.get_vocab_size() > vocab_size:
        raise InputError(f"{file.path} has {tokenizer.get_vocab_size()} tokens but an embedding of {vocab_size} "
                         "rows; the tokenizer does not belong to these weights")
    return tokenizer


def load(path: str, *, dtype: str = "float32", softmax_implementation: str = "xla", mesh=None, rules=None):
    """(model, params, tokenizer) from a GGUF file, read once.

    With a `mesh`, parameters are sharded by the logical-axis `rules` (default: parallel.mesh.LOGICAL_AXIS_RULES).
    """
    file = _open(path)
    model_config = _model_config(_config_fields(file))
    model_config.update(dtype=dtype, softmax_implementation=softmax_implementation)
    model = registry.build(model_config)
    tokenizer = _tokenizer(file, model_config.vocab_size)  # before reading any tensor data
    rules = mesh_lib.LOGICAL_AXIS_RULES if rules is None else tuple(map(tuple, rules))
    shardings = None if mesh is None else mesh_lib.sharded_abstract_params(model, mesh, rules)[1]
    return model, _load_params(file, model_config, shardings), tokenizer
