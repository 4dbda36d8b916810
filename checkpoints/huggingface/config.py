"""config.json <-> config.model: which Hugging Face architectures map onto the `llama` decoder, and how."""

import dataclasses
import json
import os

import ml_collections

from errors import InputError
from models import llama

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}
# Fields that only choose how the model runs, not what a checkpoint holds (MatryoshkaKV's compression among them:
# a Hugging Face checkpoint holds the uncompressed model, and init_from must not reset kv_rank or kv_bases).
RUNTIME_FIELDS = ("name", "softmax_implementation", "lightning_implementation", "lightning_decode_implementation",
                  "lightning_block_size", "dtype", "remat", "max_seq_len", "kv_rank", "kv_key_ranks", "kv_value_ranks",
                  "kv_bases")


def read_json(file: str) -> dict:
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
    hf = read_json(file)
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


def config_json(model_config: ml_collections.ConfigDict, dtype: str) -> dict:
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
