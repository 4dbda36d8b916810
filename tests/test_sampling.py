"""Sampling rules against transformers' logits processors, sampled frequencies against the filtered distribution
(chi-square), greedy, sharding invariance and input checks. The transformers comparisons are marked `torch` and
import it themselves, so the rest runs where torch is absent (the Python 3.12 run)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from errors import InputError
from samplers import sampling
from samplers.sampling import SamplingConfig

sample_jit = jax.jit(sampling.sample, static_argnames="config")


def random_logits(batch, vocab, seed=0, scale=3.0):
    # Continuous random values: no ties, so the kept sets are unambiguous.
    return (np.random.default_rng(seed).normal(size=(batch, vocab)) * scale).astype(np.float32)


def random_tokens(batch, length, vocab, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)


@pytest.fixture(scope="module")
def hf():
    """transformers' logits processors, for the tests that compare with them."""
    from transformers.generation import logits_process

    return logits_process


def hf_apply(processors, logits_BV, input_ids_BT=None):
    import torch
    from transformers.generation.logits_process import LogitsProcessorList

    if input_ids_BT is None:  # only the repetition penalty reads input_ids
        input_ids_BT = np.zeros((logits_BV.shape[0], 1), np.int64)
    input_ids = torch.from_numpy(input_ids_BT).long()
    return LogitsProcessorList(processors)(input_ids, torch.from_numpy(logits_BV.copy())).numpy()


def hf_processors(hf, config):
    """transformers' `generate` processors for `config`, in its order; greedy (do_sample=False) has no warpers."""
    processors = []
    if config.repetition_penalty != 1:
        processors.append(hf.RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.is_greedy:
        return processors
    if config.temperature != 1:
        processors.append(hf.TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        processors.append(hf.TopKLogitsWarper(config.top_k))
    if config.top_p < 1:
        processors.append(hf.TopPLogitsWarper(config.top_p))
    if config.min_p > 0:
        processors.append(hf.MinPLogitsWarper(config.min_p))
    return processors


def assert_same_filtered(ours_BV, theirs_BV):
    ours_BV = np.asarray(ours_BV)
    np.testing.assert_array_equal(np.isfinite(ours_BV), np.isfinite(theirs_BV), err_msg="kept token sets differ")
    np.testing.assert_allclose(
        scipy.special.softmax(ours_BV, axis=-1), scipy.special.softmax(theirs_BV, axis=-1), rtol=0, atol=1e-6
    )


@pytest.mark.torch
@pytest.mark.parametrize("vocab", [50, 1000])
@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_temperature_matches_transformers(vocab, temperature, hf):
    logits_BV = random_logits(4, vocab)
    ours_BV = sampling.apply_temperature(jnp.asarray(logits_BV), temperature)
    theirs_BV = hf_apply([hf.TemperatureLogitsWarper(temperature)], logits_BV)
    np.testing.assert_allclose(ours_BV, theirs_BV, rtol=1e-6)
    assert_same_filtered(ours_BV, theirs_BV)


@pytest.mark.torch
@pytest.mark.parametrize("vocab", [50, 1000])
@pytest.mark.parametrize("k", [1, 5, 40, 5000])
def test_top_k_matches_transformers(vocab, k, hf):
    logits_BV = random_logits(4, vocab, seed=k)
    ours_BV = sampling.top_k_filter(jnp.asarray(logits_BV), k)
    assert_same_filtered(ours_BV, hf_apply([hf.TopKLogitsWarper(k)], logits_BV))
    assert (np.isfinite(ours_BV).sum(-1) == min(k, vocab)).all()


@pytest.mark.torch
@pytest.mark.parametrize("vocab", [50, 1000])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.95, 1.0])
def test_top_p_matches_transformers(vocab, p, hf):
    logits_BV = random_logits(6, vocab, seed=int(p * 100))
    ours_BV = sampling.top_p_filter(jnp.asarray(logits_BV), p)
    assert_same_filtered(ours_BV, hf_apply([hf.TopPLogitsWarper(p)], logits_BV))


@pytest.mark.torch
@pytest.mark.parametrize("vocab", [50, 1000])
@pytest.mark.parametrize("min_p", [0.0, 0.02, 0.3, 1.0])
def test_min_p_matches_transformers(vocab, min_p, hf):
    logits_BV = random_logits(6, vocab, seed=int(min_p * 100))
    ours_BV = sampling.min_p_filter(jnp.asarray(logits_BV), min_p)
    assert_same_filtered(ours_BV, hf_apply([hf.MinPLogitsWarper(min_p)], logits_BV))


@pytest.mark.torch
@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_matches_transformers(penalty, hf):
    logits_BV = random_logits(4, 50, scale=1.0)  # both signs, so both branches of the rule run
    previous_BT = random_tokens(4, 30, 50)  # 30 draws from 50 ids: repeats included
    ours_BV = sampling.repetition_penalty(jnp.asarray(logits_BV), jnp.asarray(previous_BT), penalty)
    theirs_BV = hf_apply([hf.RepetitionPenaltyLogitsProcessor(penalty)], logits_BV, previous_BT)
    np.testing.assert_allclose(ours_BV, theirs_BV, rtol=1e-6)
    assert not np.allclose(ours_BV, logits_BV)


@pytest.mark.torch
def test_repetition_penalty_valid_mask_matches_left_padding(hf):
    import torch

    # Left padding: transformers' prompt_ignore_length skips each row's leading positions, as valid_BT does.
    logits_BV = random_logits(4, 50, scale=1.0)
    previous_BT = random_tokens(4, 20, 50)
    pad_lengths_B = np.array([0, 3, 10, 19])
    valid_BT = np.arange(20)[None, :] >= pad_lengths_B[:, None]
    ours_BV = sampling.repetition_penalty(jnp.asarray(logits_BV), jnp.asarray(previous_BT), 1.5, jnp.asarray(valid_BT))
    theirs_BV = hf_apply(
        [hf.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.from_numpy(pad_lengths_B))],
        logits_BV,
        previous_BT,
    )
    np.testing.assert_allclose(ours_BV, theirs_BV, rtol=1e-6)


@pytest.mark.torch
def test_repetition_penalty_ignores_invalid_and_out_of_vocab_positions(hf):
    # transformers drops ids >= vocab; masking a position must equal writing such an id there.
    logits_BV = random_logits(3, 50, scale=1.0)
    previous_BT = random_tokens(3, 12, 50)
    previous_BT[0, 0] = 77
    valid_BT = np.random.default_rng(2).random((3, 12)) < 0.6
    ours_BV = sampling.repetition_penalty(jnp.asarray(logits_BV), jnp.asarray(previous_BT), 1.5, jnp.asarray(valid_BT))
    theirs_BV = hf_apply([hf.RepetitionPenaltyLogitsProcessor(1.5)], logits_BV, np.where(valid_BT, previous_BT, 50))
    np.testing.assert_allclose(ours_BV, theirs_BV, rtol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=0.7, top_k=20, top_p=0.8),
        SamplingConfig(temperature=1.5, top_p=0.6, min_p=0.05, repetition_penalty=1.3),
        SamplingConfig(temperature=1.0, top_k=30, top_p=0.9, min_p=0.1, repetition_penalty=0.8),
    ],
)
def test_process_logits_matches_transformers_chain(config, hf):
    logits_BV = random_logits(4, 200, scale=2.0)
    previous_BT = random_tokens(4, 40, 200)
    ours_BV = jax.jit(sampling.process_logits, static_argnames="config")(
        jnp.asarray(logits_BV), config, jnp.asarray(previous_BT)
    )
    assert_same_filtered(ours_BV, hf_apply(hf_processors(hf, config), logits_BV, previous_BT))


@pytest.mark.torch
def test_greedy_is_argmax_of_penalised_logits(hf):
    logits_BV = random_logits(8, 100)
    tokens_B = sample_jit(jax.random.key(0), jnp.asarray(logits_BV), SamplingConfig.greedy())
    assert tokens_B.dtype == jnp.int32
    np.testing.assert_array_equal(tokens_B, logits_BV.argmax(-1))
    # Greedy ignores the key; with a penalty it is transformers' greedy pick over the penalised logits.
    previous_BT = logits_BV.argsort(-1)[:, -1:].astype(np.int32)  # penalise each row's current argmax
    config = SamplingConfig(repetition_penalty=5.0)
    tokens_B = sample_jit(jax.random.key(7), jnp.asarray(logits_BV), config, jnp.asarray(previous_BT))
    expected_B = hf_apply(hf_processors(hf, config), logits_BV, previous_BT).argmax(-1)
    np.testing.assert_array_equal(tokens_B, expected_B)
    assert (tokens_B != logits_BV.argmax(-1)).any()


CHI_SQUARE_DRAWS = 20000


@pytest.mark.torch
@pytest.mark.parametrize(
    "config, use_previous",
    [
        (SamplingConfig(temperature=0.8, top_k=7, top_p=0.8), False),
        (SamplingConfig(temperature=1.3, min_p=0.15, repetition_penalty=1.5), True),
    ],
)
def test_sampled_frequencies_match_filtered_distribution(config, use_previous, hf):
    vocab = 10
    logits_V = np.linspace(2.0, -1.6, vocab).astype(np.float32) + random_logits(1, vocab, seed=3, scale=0.1)[0]
    previous_T = np.array([0, 0, 3], np.int32)
    filtered_V = hf_apply(hf_processors(hf, config), logits_V[None], previous_T[None] if use_previous else None)[0]
    expected_V = scipy.special.softmax(filtered_V.astype(np.float64))
    kept_V = expected_V > 0
    assert 2 <= kept_V.sum() < vocab - 1, "the filters must remove some tokens and keep several"

    # One row per draw: each row gets its own key from fold_in, so the rows are independent draws.
    logits_BV = jnp.tile(jnp.asarray(logits_V), (CHI_SQUARE_DRAWS, 1))
    previous_BT = jnp.tile(jnp.asarray(previous_T), (CHI_SQUARE_DRAWS, 1)) if use_previous else None
    tokens_B = sample_jit(jax.random.key(1234), logits_BV, config, previous_BT)
    counts_V = np.bincount(np.asarray(tokens_B), minlength=vocab)

    assert counts_V[~kept_V].sum() == 0, "a filtered-out token was sampled"
    fit = scipy.stats.chisquare(counts_V[kept_V], expected_V[kept_V] * CHI_SQUARE_DRAWS)
    assert fit.pvalue > 1e-3, fit
    # Negative control: the same counts must reject the unfiltered (temperature-only) distribution.
    unfiltered_V = scipy.special.softmax(logits_V.astype(np.float64) / config.temperature)
    assert scipy.stats.chisquare(counts_V, unfiltered_V * CHI_SQUARE_DRAWS).pvalue < 1e-3


@pytest.mark.parametrize("mesh_shape", [(2, 4), (8, 1)])
def test_sharded_sampling_matches_one_device(mesh_shape):
    config = SamplingConfig(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.2)
    logits_BV = jnp.asarray(random_logits(8, 128))
    previous_BT = jnp.asarray(random_tokens(8, 16, 128))
    rng = jax.random.key(42)
    one_device = jax.devices()[0]
    expected_B = sample_jit(rng, jax.device_put(logits_BV, one_device), config, jax.device_put(previous_BT, one_device))

    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("data", "model"))
    sharded_logits_BV = jax.device_put(logits_BV, NamedSharding(mesh, P("data", "model")))
    sharded_previous_BT = jax.device_put(previous_BT, NamedSharding(mesh, P("data", None)))
    assert len(sharded_logits_BV.sharding.device_set) == 8
    tokens_B = sample_jit(rng, sharded_logits_BV, config, sharded_previous_BT)
    np.testing.assert_array_equal(tokens_B, expected_B)


def test_row_draw_depends_only_on_its_own_logits():
    config = SamplingConfig(temperature=1.0)
    logits_BV = random_logits(4, 64, scale=0.5)
    tokens_B = sample_jit(jax.random.key(5), jnp.asarray(logits_BV), config)
    logits_BV[0] = random_logits(1, 64, seed=9)[0]
    changed_B = sample_jit(jax.random.key(5), jnp.asarray(logits_BV), config)
    np.testing.assert_array_equal(tokens_B[1:], changed_B[1:])


def test_log_probs_use_raw_logits():
    logits_BV = random_logits(4, 30)
    tokens_B = np.array([0, 5, 29, 7], np.int32)
    expected_B = scipy.special.log_softmax(logits_BV, axis=-1)[np.arange(4), tokens_B]
    got_B = jax.jit(sampling.log_probs)(jnp.asarray(logits_BV), jnp.asarray(tokens_B))
    np.testing.assert_allclose(got_B, expected_B, rtol=1e-5)
    assert np.isfinite(got_B).all()  # even for tokens a filter would remove


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.2}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ],
)
def test_bad_config_raises_one_line_input_error(kwargs, setting):
    with pytest.raises(InputError) as error:
        SamplingConfig(**kwargs)
    message = str(error.value)
    assert setting in message and "\n" not in message


def test_config_is_hashable_and_defaults_to_greedy():
    assert SamplingConfig().is_greedy and SamplingConfig.greedy() == SamplingConfig()
    assert hash(SamplingConfig(top_k=3)) == hash(SamplingConfig(top_k=3))
