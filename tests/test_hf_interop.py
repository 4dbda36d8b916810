"""Hugging Face interop: tiny random transformers models of each family, imported, run against transformers
itself (logits, greedy continuations, tokenizer ids), loaded sharded, exported back, and fed bad input."""

import json
import os
import shutil

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import tokenizers
import torch
import transformers

from checkpoints import huggingface
from checkpoints.manager import Checkpoints
from configs import lm
from errors import InputError
from models import registry
from parallel import mesh as mesh_lib
from samplers.engine import Sampler, SamplerConfig

VOCAB = 320  # the tokenizer has 300 tokens; checkpoints often pad the embedding past the tokenizer
NEW_TOKENS = 32
FP32_ATOL = 1e-4
BF16_ATOL = 0.1  # ~3% of the largest logit (|logit| <= 3.5), ~6 bf16 ulps there; measured max error 0.045
PROMPTS = ("def fib(n):", "import os\nimport sys\n\n\nclass Reader:", "x = [i * i for i in range(10)]\nprint(x)",
           "return")
TEXT = "for line in open(path):\n    total += len(line.split())  # ünïcödé too\n"
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
    "llama2": (transformers.LlamaConfig, dict(rms_norm_eps=1e-5)),
    "llama3": (transformers.LlamaConfig, dict(rope_theta=500_000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),  # wavelengths of 16 x 8 dims fall in all three bands
    "mistral": (transformers.MistralConfig, dict(sliding_window=128, head_dim=8)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),  # heads * head_dim != hidden_size
}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE of 300 tokens, trained on a few lines of Python."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(PROMPTS) * 4 + [TEXT, "def main():\n    return 0\n"] * 4, trainer)
    assert tokenizer.get_vocab_size() == 300
    file = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")
    tokenizer.save(file)
    return file


def save_hf_model(family: str, directory, tokenizer_file: str, **save_kwargs):
    """A random fp32 transformers model of `family`, saved with its tokenizer; returns the torch model."""
    config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config_class(**COMMON, **extra),
                                                             dtype=torch.float32).eval()
    with torch.no_grad():  # transformers starts biases at 0 and norm scales at 1, which would hide a mislaid one
        for param in hf_model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
    hf_model.save_pretrained(directory, **save_kwargs)
    shutil.copy(tokenizer_file, os.path.join(directory, "tokenizer.json"))
    return hf_model


def hf_logits(hf_model, prompts_ids) -> list[np.ndarray]:
    """transformers' logits for each prompt, run alone (no padding)."""
    with torch.no_grad():
        return [hf_model(torch.tensor([ids])).logits[0].numpy() for ids in prompts_ids]


def right_padded(prompts_ids):
    lengths_B = np.array([len(ids) for ids in prompts_ids], np.int32)
    tokens_BT = np.zeros((len(prompts_ids), lengths_B.max()), np.int32)
    for row, ids in enumerate(prompts_ids):
        tokens_BT[row, :len(ids)] = ids
    return jnp.asarray(tokens_BT), jnp.asarray(lengths_B)


class Runner:
    """Jitted prefill and decode step of one decodelab model, compiled once per family and dtype."""

    def __init__(self, model):
        self.model = model
        self.forward = jax.jit(lambda params, tokens_BT: model.apply({"params": params}, tokens_BT)[0])
        self.prefill = jax.jit(lambda params, tokens_BT, cache, lengths_B: model.apply(
            {"params": params}, tokens_BT, cache, lengths_B))
        self.step = jax.jit(lambda params, tokens_B1, cache: model.apply({"params": params}, tokens_B1, cache))


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory, tokenizer_file):
    """One family: its saved transformers model, the decodelab import, and transformers' reference logits."""
    family = request.param
    directory = str(tmp_path_factory.mktemp(family))
    hf_model = save_hf_model(family, directory, tokenizer_file)
    model, params, tokenizer = huggingface.load(directory)
    prompts_ids = [tokenizer.encode(prompt).ids for prompt in PROMPTS]
    return dict(family=family, directory=directory, hf_model=hf_model, model=model, params=params,
                tokenizer=tokenizer, prompts_ids=prompts_ids, reference=hf_logits(hf_model, prompts_ids),
                runner=Runner(model))


def assert_logits_close(logits_BTV, prompts_ids, reference, atol):
    for row, (ids, expected_TV) in enumerate(zip(prompts_ids, reference)):
        np.testing.assert_allclose(np.asarray(logits_BTV[row, :len(ids)]), expected_TV, atol=atol, rtol=0)


def test_logits_and_tokenizer_match_transformers(imported):
    tokens_BT, lengths_B = right_padded(imported["prompts_ids"])
    runner = imported["runner"]
    assert_logits_close(runner.forward(imported["params"], tokens_BT), imported["prompts_ids"],
                        imported["reference"], FP32_ATOL)
    cache = imported["model"].init_cache(tokens_BT.shape[0], tokens_BT.shape[1])
    prefill_BTV, _ = runner.prefill(imported["params"], tokens_BT, cache, lengths_B)
    assert_logits_close(prefill_BTV, imported["prompts_ids"], imported["reference"], FP32_ATOL)

    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(imported["directory"], "tokenizer.json"))
    assert imported["tokenizer"].encode(TEXT).ids == hf_tokenizer.encode(TEXT, add_special_tokens=False)


def test_greedy_decode_engine_matches_generate(imported):
    """The decode engine (batched, ragged prompts, jitted while_loop) equals transformers' generate per prompt."""
    sampler = Sampler(imported["model"], imported["params"], imported["tokenizer"],
                      SamplerConfig(max_new_tokens=NEW_TOKENS))
    ours = sampler.generate_tokens(imported["prompts_ids"]).tokens
    for row, ids in enumerate(imported["prompts_ids"]):
        with torch.no_grad():
            out = imported["hf_model"].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                                do_sample=False, max_new_tokens=NEW_TOKENS)
        assert ours[row] == out[0, len(ids):].tolist(), f"row {row}"


def test_bf16_compute_matches_fp32_reference(imported):
    model_config = huggingface.model_config_from_hf(imported["directory"])
    model_config.dtype = "bfloat16"
    model = registry.build(model_config)
    tokens_BT, lengths_B = right_padded(imported["prompts_ids"])
    cache = model.init_cache(tokens_BT.shape[0], tokens_BT.shape[1])
    logits_BTV, _ = jax.jit(lambda params, tokens_BT, cache, lengths_B: model.apply(
        {"params": params}, tokens_BT, cache, lengths_B))(imported["params"], tokens_BT, cache, lengths_B)
    assert logits_BTV.dtype == jnp.float32
    assert_logits_close(logits_BTV, imported["prompts_ids"], imported["reference"], BF16_ATOL)


def test_export_reloads_in_transformers(imported, tmp_path):
    model_config = huggingface.model_config_from_hf(imported["directory"])
    out_dir = huggingface.export_hf(imported["params"], model_config,
                                    os.path.join(imported["directory"], "tokenizer.json"), str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    for expected_TV, actual_TV in zip(imported["reference"], hf_logits(reloaded, imported["prompts_ids"])):
        np.testing.assert_allclose(actual_TV, expected_TV, atol=FP32_ATOL, rtol=0)
    # And back into decodelab, bit for bit.
    _, params, _ = huggingface.load(out_dir)
    jax.tree.map(np.testing.assert_array_equal, params, imported["params"])


@pytest.mark.parametrize("mesh_sizes", [dict(data=1, fsdp=2, tensor=4), dict(data=2, fsdp=1, tensor=4)],
                         ids=["fsdp2_tensor4", "data2_tensor4"])
def test_sharded_index_loads_onto_mesh(mesh_sizes, tmp_path, tokenizer_file):
    directory = str(tmp_path / "qwen2")
    hf_model = save_hf_model("qwen2", directory, tokenizer_file, max_shard_size=40_000)
    assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
    config = lm.get_config()
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(mesh_sizes))
    model, params, tokenizer = huggingface.load(directory, mesh=mesh, rules=config.logical_axis_rules)
    wanted = mesh_lib.sharded_abstract_params(model, mesh, mesh_lib.axis_rules(config))[1]
    for param, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(wanted)):
        assert param.sharding.is_equivalent_to(sharding, param.ndim)
    # The embedding [V, D] is split over vocab (tensor) and, with fsdp, over embed too.
    assert params["embedding"].addressable_shards[0].data.shape == (VOCAB // 4, 64 // mesh_sizes["fsdp"])

    prompts_ids = [tokenizer.encode(prompt).ids for prompt in PROMPTS]
    tokens_BT, _ = right_padded(prompts_ids)
    rules = mesh_lib.axis_rules(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logits_BTV = jax.jit(lambda params, tokens_BT: model.apply({"params": params}, tokens_BT)[0])(
            params, tokens_BT)
    assert_logits_close(logits_BTV, prompts_ids, hf_logits(hf_model, prompts_ids), FP32_ATOL)


def test_config_from_old_layout_and_sliding_window(tmp_path):
    """Pre-transformers-5 config.json files keep rope_theta and rope_scaling at the top level."""
    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=500_000.0,
              rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192), max_position_embeddings=131072)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    model_config = huggingface.model_config_from_hf(str(tmp_path))
    assert set(model_config) == set(lm.get_config().model)
    assert (model_config.num_kv_heads, model_config.head_dim, model_config.rope_theta) == (4, 16, 500_000.0)
    assert (model_config.rope_scaling_type, model_config.rope_scaling_factor) == ("llama3", 32.0)
    assert (model_config.rope_original_max_len, model_config.max_seq_len) == (8192, 131072)
    assert not model_config.tie_embeddings

    hf.update(architectures=["MistralForCausalLM"], rope_scaling=None, sliding_window=4096)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    model_config = huggingface.model_config_from_hf(str(tmp_path))
    assert (model_config.rope_scaling_type, model_config.max_seq_len) == ("", 4096)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_file):
    """A saved tiny Llama that error tests copy and then break."""
    directory = str(tmp_path_factory.mktemp("llama_good"))
    save_hf_model("llama2", directory, tokenizer_file)
    return directory


def test_export_tool_writes_a_run_as_hf(llama_dir, tmp_path):
    """tools/export_hf.py: a decodelab run's checkpoint -> a directory transformers loads with the same logits."""
    from tools import export_hf  # defines its flags on import; only this test needs them

    config = lm.get_config()
    config.model = huggingface.model_config_from_hf(llama_dir)
    _, params, tokenizer = huggingface.load(llama_dir)
    workdir = str(tmp_path / "run")
    checkpoints = Checkpoints(workdir)
    checkpoints.save({"step": jnp.array(7, jnp.int32), "params": params, "opt_state": {"count": jnp.zeros(())}},
                     iter(grain.MapDataset.range(4).to_iter_dataset()))
    checkpoints.wait_until_finished()
    checkpoints.close()
    shutil.copy(os.path.join(llama_dir, "tokenizer.json"), workdir)

    out_dir = export_hf.export(config, workdir, str(tmp_path / "hf"), "bfloat16")
    with safetensors.safe_open(os.path.join(out_dir, "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    prompts_ids = [tokenizer.encode(prompt).ids for prompt in PROMPTS]
    for expected_TV, actual_TV in zip(hf_logits(original, prompts_ids), hf_logits(reloaded, prompts_ids)):
        np.testing.assert_allclose(actual_TV, expected_TV, atol=BF16_ATOL, rtol=0)  # weights rounded to bf16
    _, bf16_params, _ = huggingface.load(out_dir)  # bf16 safetensors read back as the float32 of the rounded weights
    jax.tree.map(lambda ours, rounded: np.testing.assert_array_equal(ours, rounded.astype(jnp.bfloat16)),
                 jax.tree.map(np.asarray, bf16_params), jax.tree.map(np.asarray, params))


def broken_copy(llama_dir, tmp_path, **config_changes):
    directory = str(tmp_path / "broken")
    shutil.copytree(llama_dir, directory)
    if config_changes:
        file = os.path.join(directory, "config.json")
        with open(file) as f:
            hf = json.load(f)
        with open(file, "w") as f:
            json.dump(hf | config_changes, f)
    return directory


def rewrite_weights(directory, change):
    file = os.path.join(directory, "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    change(tensors)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def test_unsupported_architecture_lists_supported(llama_dir, tmp_path):
    directory = broken_copy(llama_dir, tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(InputError, match=r"config.json architectures=\['GPT2LMHeadModel'\].*supported: "
                                         r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        huggingface.load(directory)


def test_missing_shard(tmp_path, tokenizer_file):
    directory = str(tmp_path / "sharded")
    save_hf_model("llama2", directory, tokenizer_file, max_shard_size=40_000)
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(directory, shard))
    with pytest.raises(InputError, match=f"index.json lists the shard {shard}, which is missing"):
        huggingface.load(directory)


@pytest.mark.parametrize("break_it, message", [
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)}),
     "model.safetensors: tensor model.norm.weight has dtype I32"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "has no tensor model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}),
     "tensor model.layers.0.self_attn.o_proj.bias .* has no place"),
])
def test_bad_tensors(llama_dir, tmp_path, break_it, message):
    directory = broken_copy(llama_dir, tmp_path)
    rewrite_weights(directory, break_it)
    with pytest.raises(InputError, match=message):
        huggingface.load(directory)


def test_shape_mismatch_names_tensor(llama_dir, tmp_path):
    directory = broken_copy(llama_dir, tmp_path, intermediate_size=96)
    with pytest.raises(InputError, match=r"tensor model.layers.0.mlp.down_proj.weight has shape \(64, 128\) but "
                                         r".*config.json implies \(64, 96\)"):
        huggingface.load(directory)


def test_config_model_must_match_checkpoint(llama_dir):
    model_config = huggingface.model_config_from_hf(llama_dir)
    model_config.rope_theta = 1e6
    with pytest.raises(InputError, match="config.model.rope_theta=1000000.0 does not match"):
        huggingface.load_hf_params(llama_dir, model_config)


def test_tokenizer_bigger_than_vocab(llama_dir, tmp_path):
    directory = broken_copy(llama_dir, tmp_path)
    file = os.path.join(directory, "tokenizer.json")
    tokenizer = tokenizers.Tokenizer.from_file(file)
    tokenizer.add_special_tokens([f"<extra_{i}>" for i in range(VOCAB)])
    tokenizer.save(file)
    with pytest.raises(InputError, match=f"tokenizer.json has {300 + VOCAB} tokens but the model's vocab_size is "
                                         f"{VOCAB}"):
        huggingface.load(directory)


def test_pickles_are_never_read(llama_dir, tmp_path):
    directory = str(tmp_path / "pickled")
    os.makedirs(directory)
    shutil.copy(os.path.join(llama_dir, "config.json"), directory)
    shutil.copy(os.path.join(llama_dir, "tokenizer.json"), directory)
    with open(os.path.join(directory, "pytorch_model.bin"), "wb") as f:
        f.write(b"would run code if unpickled")
    with pytest.raises(InputError, match="only PyTorch pickles \\(pytorch_model.bin\\); only safetensors are read"):
        huggingface.load(directory)


@pytest.mark.slow
def test_init_from_evaluates_and_fine_tunes_an_imported_model(llama_dir, tmp_path):
    """--config.init_from=hf:PATH: evaluate.py scores the model with its own tokenizer on the default corpus, and
    train.py starts from its weights (with a zero learning rate the evaluation is unchanged)."""
    import evaluate
    import train

    config = lm.get_config("tiny")
    config.init_from = f"hf:{llama_dir}"
    config.data.update(max_files=40, validation_fraction=0.25, tfds_data_dir=str(tmp_path / "tfds"), seq_len=32,
                       global_batch_size=8, shuffle_windows=256)
    config.evaluate.update(run=("validation", "samples"), validation={"num_batches": 2})
    config.evaluate.samples.update(num_prompts=1, max_new_tokens=4, samplers={"greedy": {}})
    config.optimizer.update(learning_rate=0.0, weight_decay=0.0)
    config.train.update(num_steps=1, log_every=1, evaluate_every=0)

    imported = evaluate.evaluate(config, str(tmp_path / "eval_imported"))
    assert imported["checkpoint"] == config.init_from and imported["step"] is None
    assert np.isfinite(imported["validation"]["loss"])
    assert imported["validation"]["perplexity"] == pytest.approx(np.exp(imported["validation"]["loss"]))

    history = train.train_and_evaluate(config, str(tmp_path / "fine_tune"))
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    fine_tuned = evaluate.evaluate(config, str(tmp_path / "fine_tune"))
    assert fine_tuned["step"] == 1
    assert fine_tuned["validation"]["loss"] == pytest.approx(imported["validation"]["loss"], rel=1e-5)
