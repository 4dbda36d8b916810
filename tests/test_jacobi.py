"""Jacobi decoding against the engine's greedy decoding: the same tokens and the same cache on random softmax,
lightning and hybrid models (batched, ragged prompts, stop tokens, a nearly full cache), fewer forwards than tokens
on a model whose greedy output repeats, its input rules, and its evaluator."""

import json.decoder
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
import tokenizers

import evaluators
from configs import lm
from data import tokenizer as tokenizer_lib
from errors import InputError
from models.kv_cache import KVCache
from models.linear_state import LinearState
from models.llama import Config, Model
from samplers.engine import Sampler, SamplerConfig
from samplers.jacobi import Jacobi, JacobiConfig
from samplers.plain import PlainSampling
from samplers.sampling import SamplingConfig

VOCAB = 64
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [40], [3, 1, 4, 1, 5]]  # ragged
MIXER_PATTERNS = ("softmax", "lightning", "lightning,softmax")


def _model(mixer_pattern: str, **overrides) -> Model:
    return Model(Config(**{**dict(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                                  head_dim=8, mlp_dim=64, max_seq_len=256, mixer_pattern=mixer_pattern,
                                  lightning_block_size=8), **overrides}))


def _params(model, scale=3.0):
    # Larger weights than the init's make the argmax depend on the context, so guesses are often wrong.
    params = nn.meta.unbox(model.init(jax.random.key(0), *model.example_inputs())["params"])
    return jax.tree.map(lambda x: scale * x, params)


def _decode(model, params, config: SamplerConfig, strategy=PlainSampling()):
    sampler = Sampler(model, params, None, config, strategy)
    state = sampler.decode(sampler.prefill(PROMPTS))
    return sampler, state, sampler.output(state, len(PROMPTS))


def _assert_same_cache(jacobi_cache, greedy_cache):
    """The same lengths; keys and values up to each row's length and linear-attention states close (the window's
    positions are computed in one pass instead of one by one)."""
    lengths_B = np.asarray(greedy_cache.lengths_B)
    np.testing.assert_array_equal(np.asarray(jacobi_cache.lengths_B), lengths_B)
    for jacobi_layer, greedy_layer in zip(jacobi_cache.layers, greedy_cache.layers):
        if isinstance(greedy_layer, KVCache):
            for jacobi_BKSH, greedy_BKSH in ((jacobi_layer.k_BKSH, greedy_layer.k_BKSH),
                                             (jacobi_layer.v_BKSH, greedy_layer.v_BKSH)):
                for b, length in enumerate(lengths_B):
                    np.testing.assert_allclose(np.asarray(jacobi_BKSH[b, :, :length]),
                                               np.asarray(greedy_BKSH[b, :, :length]), rtol=1e-4, atol=1e-4)
        else:
            assert isinstance(greedy_layer, LinearState)
            np.testing.assert_allclose(np.asarray(jacobi_layer.state_BHDE), np.asarray(greedy_layer.state_BHDE),
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer_pattern", MIXER_PATTERNS)
def test_tokens_and_cache_equal_greedy(mixer_pattern):
    model = _model(mixer_pattern)
    params = _params(model)
    config = SamplerConfig(max_new_tokens=24, prompt_buckets=(8,))
    greedy_sampler, greedy_state, greedy = _decode(model, params, config)
    # A stop token that greedy decoding reaches in the middle of the first row: rows end at different steps.
    config = SamplerConfig(max_new_tokens=24, prompt_buckets=(8,), stop_tokens=(greedy.tokens[0][9],))
    greedy_sampler, greedy_state, greedy = _decode(model, params, config)
    assert "stop_token" in greedy.stop_reason and "max_new_tokens" in greedy.stop_reason
    sampler, state, output = _decode(model, params, config, Jacobi(JacobiConfig(window=5)))
    assert output.tokens == greedy.tokens and output.stop_reason == greedy.stop_reason
    np.testing.assert_allclose(np.concatenate(output.log_probs), np.concatenate(greedy.log_probs), atol=1e-4)
    _assert_same_cache(state.strategy.cache, greedy_state.strategy.cache)

    summary = sampler.strategy.summary(sampler, state, len(PROMPTS))
    assert summary["generated_tokens"] == sum(len(t) for t in greedy.tokens)
    # Every token but each row's first (the prefill's) was committed by a step; the steps add up.
    assert summary["committed"] == summary["generated_tokens"] - len(PROMPTS)
    assert summary["committed"] == summary["iterations"] + summary["fast_forwarded"]
    assert 0 <= summary["stationary"] <= summary["fast_forwarded"]
    histogram = summary["commits_histogram"]
    assert sum(histogram) == summary["iterations"] and histogram[0] == 0
    assert sum(c * n for c, n in enumerate(histogram)) == summary["committed"]


@pytest.mark.parametrize("mixer_pattern", ("softmax", pytest.param("lightning,softmax", marks=pytest.mark.slow)))
def test_nearly_full_cache_checks_fewer_guesses_and_ends_like_greedy(mixer_pattern):
    """With a cache of 24 positions, rows run out of room for a whole window of 8 and end as greedy rows do."""
    model = _model(mixer_pattern)
    params = _params(model)
    config = SamplerConfig(max_new_tokens=64, cache_len=24, prompt_buckets=(8,))
    _, greedy_state, greedy = _decode(model, params, config)
    assert set(greedy.stop_reason) == {"cache_full"}
    _, state, output = _decode(model, params, config, Jacobi(JacobiConfig(window=8)))
    assert output.tokens == greedy.tokens and output.stop_reason == greedy.stop_reason
    _assert_same_cache(state.strategy.cache, greedy_state.strategy.cache)


@pytest.mark.parametrize("mixer_pattern", [p if p == "lightning,softmax" else pytest.param(p, marks=pytest.mark.slow)
                                           for p in MIXER_PATTERNS])
def test_repetitive_model_commits_several_tokens_per_forward(mixer_pattern):
    """A model that barely reads its input (its token embeddings pulled to within 10% of one vector, untied from
    the unembedding) writes long runs of one or two tokens under greedy decoding, as small models often do: its guesses
    are right behind wrong ones (stationary tokens), and Jacobi decoding needs fewer forwards than tokens (fewest
    for runs of one token, which the window's copies of the newest token guess right)."""
    model = _model(mixer_pattern, tie_embeddings=False)
    params = _params(model)
    params["embedding"] = params["embedding"][:1] + 0.1 * (params["embedding"] - params["embedding"][:1])
    config = SamplerConfig(max_new_tokens=32, prompt_buckets=(8,))
    _, _, greedy = _decode(model, params, config)
    sampler, state, output = _decode(model, params, config, Jacobi(JacobiConfig(window=8)))
    assert output.tokens == greedy.tokens
    summary = sampler.strategy.summary(sampler, state, len(PROMPTS))
    assert summary["forwards_per_token"] < 0.75, summary
    assert summary["stationary"] > 0 and summary["commits_histogram"][-1] > 0, summary


@pytest.mark.parametrize("make, match", [
    (lambda: JacobiConfig(window=0), r"^jacobi\.window=0 must be an integer >= 1$"),
    (lambda: JacobiConfig(window=2.5), r"^jacobi\.window=2\.5 must be an integer"),
    (lambda: JacobiConfig(sampling=SamplingConfig(temperature=0.7)), r"^jacobi\.sampling\.temperature=0\.7 must be 0"),
    (lambda: JacobiConfig(sampling=SamplingConfig(repetition_penalty=1.2)),
     r"^jacobi\.sampling\.repetition_penalty=1\.2 must be 1"),
    (lambda: Sampler(_model("softmax"), _params(_model("softmax")), None,
                     SamplerConfig(max_new_tokens=4, cache_len=16), Jacobi(JacobiConfig(window=16))),
     r"^jacobi\.window=16: a step writes window \+ 1 = 17 positions .* SamplerConfig\.cache_len=16 cannot hold$"),
    (lambda: Sampler(_model("lightning", max_seq_len=8), _params(_model("lightning", max_seq_len=8)), None,
                     SamplerConfig(max_new_tokens=4), Jacobi(JacobiConfig(window=7))),
     r"^jacobi\.window=7: .* the model's max_seq_len=8 cannot hold$"),
])
def test_bad_input_raises_one_line_input_error(make, match):
    with pytest.raises(InputError, match=match) as error:
        make()
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# The evaluator (evaluators/jacobi.py), on next-line prompts of a held-out stdlib file.

def _tokenizer(text: str) -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB * 4, special_tokens=[tokenizer_lib.EOS],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def test_evaluator_reports_greedy_tokens_and_the_counts():
    config = lm.get_config("tiny")
    config.evaluate.jacobi.update(window=4, prefix_tokens=16, new_tokens=8, num_prompts=3)
    evaluators.validate(("jacobi",), config, "config.evaluate.run")
    text = pathlib.Path(json.decoder.__file__).read_text()
    model = _model("lightning,softmax", vocab_size=VOCAB * 4)
    context = evaluators.Context(config, "", model, _tokenizer(text), {"validation": [{"text": text}]}, None, None)
    evaluator = evaluators.build("jacobi", context)
    results = evaluator.run(_params(model))
    evaluator.report(results)
    assert (results["prompts"], results["window"], results["equal_to_greedy"]) == (3, 4, 1.0)
    assert results["committed"] == results["iterations"] + results["fast_forwarded"] > 0
    assert results["generated_tokens"] <= 3 * 8 and results["tokens_per_iteration"] >= 1


@pytest.mark.parametrize("key, value, match", [
    ("window", 0, r"^config\.evaluate\.jacobi\.window=0 must be an integer >= 1$"),
    ("window", 2047, r"^config\.evaluate\.jacobi\.window=2047: .* config\.model\.max_seq_len=2048 cannot hold$"),
    ("new_tokens", 0, r"^config\.evaluate\.jacobi\.new_tokens=0 must be an integer >= 1$"),
])
def test_bad_evaluator_settings_raise_one_line_input_error(key, value, match):
    config = lm.get_config("tiny")
    config.evaluate.jacobi[key] = value
    with pytest.raises(InputError, match=match):
        evaluators.validate(("jacobi",), config, "config.evaluate.run")
