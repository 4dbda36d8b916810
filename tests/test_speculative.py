"""Speculative decoding (samplers/speculative.py): the rejection rule against its closed form, the distribution of
what it emits against the target's exact one (a chi-square test, with a broken verifier as negative control),
greedy tokens equal to greedy decoding on the Hugging Face families and on lightning and hybrid models, caches
after verification equal to never having drafted, and one-line errors for bad input."""

import collections
import itertools
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from checkpoints.huggingface import config as hf_config
from errors import InputError
from models import registry
from models.kv_cache import KVCache
from models.llama import Config, Model
from models.token_tree import TokenTree
from samplers import ngram_store, sampling, tree_verification
from samplers.draft_model import DraftModel
from samplers.engine import Sampler, SamplerConfig
from samplers.ngram_draft import NgramDraft, NgramDraftConfig
from samplers.sampling import SamplingConfig
from samplers.speculative import Speculative, SpeculativeConfig
from samplers.strategy import Prefill

GREEDY = SamplingConfig()


def _init(model, seed=0, scale=3.0):
    params = nn.meta.unbox(model.init(jax.random.key(seed), *model.example_inputs())["params"])
    return jax.tree.map(lambda x: scale * x, params)


def _perturbed(params, amount=0.1):
    """A draft close to the target: it agrees often, but not always."""
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [x * (1 + amount * jax.random.normal(jax.random.fold_in(jax.random.key(3), i),
                                                                             x.shape)) for i, x in enumerate(leaves)])


# ---------------------------------------------------------------------------------------------------------------------
# The rule.

def test_greedy_verification_keeps_the_longest_path_of_argmaxes():
    tree = TokenTree((2, 1))  # root; children 1, 2; grandchildren 3 (of 1), 4 (of 2)
    V = 6
    # The target's argmax after each node: root -> 5, node 2 -> 4, node 4 -> 1; nodes 1, 3 -> 0.
    argmax_N = np.array([5, 0, 4, 0, 1])
    logits_BNV = jnp.asarray(np.eye(V)[argmax_N][None] * 10.0)
    for tokens, path, accepted, next_token in (
            ([0, 3, 5, 2, 4], [0, 2, 4], 2, 1),  # the second child matches, then its child: all accepted, bonus
            ([0, 5, 3, 2, 2], [0, 1, 1], 1, 0),  # the first child matches, its child does not
            ([0, 1, 2, 3, 4], [0, 0, 0], 0, 5)):  # nothing matches: the target's own token
        path_BL, accepted_B, next_B = tree_verification.verify(jax.random.key(0), logits_BNV, jnp.array([tokens]),
                                                               None, tree, GREEDY)
        assert path_BL[0].tolist() == path and int(accepted_B[0]) == accepted and int(next_B[0]) == next_token


def test_rejection_rule_matches_its_closed_form():
    """One draft x ~ q: accepted with probability min(1, p(x)/q(x)); on rejection the next token follows
    norm(max(p - q, 0)). Two deterministic siblings x1, x2: the first is accepted with probability p(x1), the
    second with p(x2). Frequencies over 40,000 rows within 5 standard errors."""
    rows, V = 40_000, 4
    p_V, q_V = np.array([0.1, 0.5, 0.3, 0.1]), np.array([0.4, 0.2, 0.2, 0.2])
    logits_BNV = jnp.broadcast_to(jnp.log(jnp.asarray(p_V, jnp.float32)), (rows, 2, V))
    q_BNV = jnp.broadcast_to(jnp.asarray(q_V, jnp.float32), (rows, 2, V))
    temperature_1 = SamplingConfig(temperature=1.0)

    def frequency_close(observed, expected):
        assert abs(observed - expected) < 5 * np.sqrt(expected * (1 - expected) / rows) + 1e-9, (observed, expected)

    for x in range(V):
        tokens_BN = jnp.full((rows, 2), x)
        _, accepted_B, next_B = tree_verification.verify(jax.random.key(x), logits_BNV, tokens_BN, q_BNV,
                                                         TokenTree((1,)), temperature_1)
        accepted_B, next_B = np.asarray(accepted_B), np.asarray(next_B)
        frequency_close(accepted_B.mean(), min(1, p_V[x] / q_V[x]))
        residual_V = np.maximum(p_V - q_V, 0) / np.maximum(p_V - q_V, 0).sum()
        rejected = next_B[accepted_B == 0]
        if len(rejected) > 1000:
            for y in range(V):
                assert abs((rejected == y).mean() - residual_V[y]) < 5 * np.sqrt(0.25 / len(rejected))

    tree = TokenTree((2,))
    logits_BNV = jnp.broadcast_to(jnp.log(jnp.asarray(p_V, jnp.float32)), (rows, 3, V))
    path_BL, _, _ = tree_verification.verify(jax.random.key(9), logits_BNV, jnp.tile(jnp.array([0, 1, 2]), (rows, 1)),
                                             None, tree, temperature_1)
    frequency_close(float(np.mean(path_BL[:, 1] == 1)), p_V[1])
    frequency_close(float(np.mean(path_BL[:, 1] == 2)), p_V[2])


# ---------------------------------------------------------------------------------------------------------------------
# Distribution exactness: the first three tokens over 20,000 seeded rows against the exact target distribution.

TINY_VOCAB = 5
PROMPT = [1, 3]
SAMPLES = 20_000


@pytest.fixture(scope="module")
def tiny_models():
    def tiny(seed, scale):
        model = Model(Config(vocab_size=TINY_VOCAB, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=2,
                             head_dim=8, mlp_dim=32, max_seq_len=256))
        return model, _init(model, seed, scale)

    return tiny(0, 2.0), tiny(7, 4.0)  # a target and a deliberately different, sharper draft


def _exact_distribution(model, params, config: SamplingConfig) -> np.ndarray:
    """[V, V, V] the target's probability of each first three tokens, by full forwards over every prefix."""
    V = TINY_VOCAB
    prefixes = np.array([PROMPT + [a, b] for a, b in itertools.product(range(V), repeat=2)])
    logits_BTV, _ = model.apply({"params": params}, jnp.asarray(prefixes))
    probs = lambda logits: np.asarray(jax.nn.softmax(sampling.process_logits(logits, config), axis=-1))  # noqa: E731
    p1_V = probs(logits_BTV[:1, len(PROMPT) - 1])[0]
    p2_AV = probs(logits_BTV[::V, len(PROMPT)])
    p3_ABV = probs(logits_BTV[:, len(PROMPT) + 1]).reshape(V, V, V)
    return p1_V[:, None, None] * p2_AV[:, :, None] * p3_ABV


def _chi_square_p_value(tokens: list[list[int]], exact_VVV: np.ndarray) -> float:
    observed = np.zeros(exact_VVV.size)
    np.add.at(observed, [np.ravel_multi_index(t[:3], exact_VVV.shape) for t in tokens], 1)
    expected = exact_VVV.ravel().astype(np.float64) * len(tokens)
    small = expected < 5  # pooled into one cell, as chi-square needs
    assert observed[expected == 0].sum() == 0  # nothing the target cannot produce
    observed, expected = np.append(observed[~small], observed[small].sum()), np.append(expected[~small],
                                                                                       expected[small].sum())
    observed, expected = observed[expected > 0], expected[expected > 0]
    return scipy.stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


CASES = {
    "chain, temperature 1": ((1, 1), SamplingConfig(temperature=1.0), "draft"),
    "chain, top-k and top-p": ((1, 1), SamplingConfig(temperature=0.8, top_k=3, top_p=0.9), "draft"),
    "tree, temperature 1": ((2, 2), SamplingConfig(temperature=1.0), "draft"),
    "tree, top-k and top-p": ((3, 1), SamplingConfig(temperature=1.3, top_k=4, top_p=0.8), "draft"),
    "n-gram tree, temperature 1": ((2, 1), SamplingConfig(temperature=1.0), "ngram"),
}
# Fast: a chain at temperature 1, a tree with top-k and top-p, and the negative control.
SLOW_CASES = ("chain, top-k and top-p", "tree, temperature 1", "n-gram tree, temperature 1")


def _emitted(tiny_models, branching, config, drafter, skip_residual=False):
    (model, params), (draft_model, draft_params) = tiny_models
    drafter = DraftModel(draft_model, draft_params) if drafter == "draft" else NgramDraft()
    strategy = Speculative(SpeculativeConfig(branching, config), drafter, skip_residual=skip_residual)
    sampler = Sampler(model, params, None, SamplerConfig(max_new_tokens=3, prompt_buckets=(4,)), strategy)
    return sampler.generate_tokens([PROMPT] * SAMPLES, seed=11).tokens


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_speculative_samples_follow_the_target_distribution(tiny_models, case):
    branching, config, drafter = CASES[case]
    (model, params), _ = tiny_models
    p_value = _chi_square_p_value(_emitted(tiny_models, branching, config, drafter),
                                  _exact_distribution(model, params, config))
    assert p_value > 0.01, p_value


def test_the_chi_square_test_rejects_a_verifier_that_skips_the_residual(tiny_models):
    (model, params), _ = tiny_models
    config = SamplingConfig(temperature=1.0)
    p_value = _chi_square_p_value(_emitted(tiny_models, (1, 1), config, "draft", skip_residual=True),
                                  _exact_distribution(model, params, config))
    assert p_value < 1e-6, p_value


# ---------------------------------------------------------------------------------------------------------------------
# Greedy speculative decoding is greedy decoding.

VOCAB = 96
PROMPTS = [[5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 12, 13], [40], [1, 2, 3, 4, 1, 2]]
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=256)
FAMILIES = {  # config.json of each Hugging Face family the llama decoder imports (tests/test_hf_interop.py)
    "llama2": dict(model_type="llama"),
    "llama3": dict(model_type="llama", rope_theta=500_000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "mistral": dict(model_type="mistral", sliding_window=256, head_dim=8),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=16),
}


def _family_model(family, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(COMMON, **FAMILIES[family])))
    return registry.build(hf_config.model_config_from_hf(str(tmp_path)))


def _greedy_matches(model, params, strategy):
    config = SamplerConfig(max_new_tokens=16, prompt_buckets=(8,), stop_tokens=(0,))
    greedy = Sampler(model, params, None, config).generate_tokens(PROMPTS)
    sampler = Sampler(model, params, None, config, strategy)
    state = sampler.decode(sampler.prefill(PROMPTS))
    assert sampler.output(state, len(PROMPTS)).tokens == greedy.tokens
    return state.strategy


FAST_FAMILIES = ("llama3", "qwen3")  # between them: rope scaling, q/k norms, head_dim apart from the width


@pytest.mark.parametrize("family", [f if f in FAST_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_greedy_tree_speculation_equals_greedy_decoding_on_hugging_face_families(family, tmp_path):
    model = _family_model(family, tmp_path)
    params = _init(model)
    state = _greedy_matches(model, params, Speculative(SpeculativeConfig((2, 2, 1)),
                                                       DraftModel(model, _perturbed(params))))
    assert int(np.sum(state.accepted_B)) > 0  # some drafts were accepted: the path was really kept


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("branching", [(1, 1, 1, 1), (3, 2)])
def test_greedy_ngram_speculation_equals_greedy_decoding_on_hugging_face_families(family, branching, tmp_path):
    model = _family_model(family, tmp_path)
    _greedy_matches(model, _init(model), Speculative(SpeculativeConfig(branching), NgramDraft()))


def _linear_model(mixer_pattern):
    return Model(Config(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=64, max_seq_len=256, mixer_pattern=mixer_pattern, lightning_block_size=8))


@pytest.mark.parametrize("mixer_pattern,branching,drafter", [
    ("lightning", (1, 1, 1), "draft"), ("lightning,softmax", (2, 2, 1), "draft"),
    pytest.param("lightning", (3, 1, 1), "ngram", marks=pytest.mark.slow),
    pytest.param("lightning", (2, 2, 1), "draft", marks=pytest.mark.slow),
    pytest.param("lightning,softmax", (1, 1, 1), "draft", marks=pytest.mark.slow),
    pytest.param("lightning,softmax", (3, 1, 1), "ngram", marks=pytest.mark.slow)])
def test_greedy_speculation_equals_greedy_decoding_on_linear_and_hybrid_models(mixer_pattern, branching, drafter):
    model = _linear_model(mixer_pattern)
    params = _init(model)
    draft = DraftModel(model, _perturbed(params)) if drafter == "draft" else NgramDraft()
    _greedy_matches(model, params, Speculative(SpeculativeConfig(branching), draft))


def test_ngram_drafts_come_from_the_context_and_the_store():
    """Children are the tokens that followed the longest earlier match of the node's context, most recent first;
    a context the history has not seen is drafted from the store's most frequent continuation."""
    history = [1, 2, 3, 4, 9, 1, 2, 3, 7, 1, 2, 3]
    ctx = types.SimpleNamespace(tokens_BN=jnp.array([history[3:] + [-1] * 4]), num_tokens_B=jnp.array([9]))
    drafter = NgramDraft(NgramDraftConfig(max_n=3))
    state = drafter.init(None, None, Prefill(None, None, jnp.array([history[:3]]), jnp.array([3]), None), None)
    _, drafts_BM, probs = drafter.propose(ctx, None, state, None, TokenTree((2, 1)), GREEDY, None)
    assert drafts_BM[0].tolist() == [7, 4, 1, 9] and probs is None  # "1 2 3" -> 7, 4; "2 3 7" -> 1; "2 3 4" -> 9

    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 8, 60) for _ in range(20)]
    store = ngram_store.build_ngram_store(sequences, (2, 3), vocab_size=8)
    context = (5, 6)
    followers = collections.Counter(int(s[i + 2]) for s in sequences for i in range(len(s) - 2)
                                    if tuple(s[i:i + 2]) == context)
    tokens_BD1, counts_BD1 = ngram_store.top_continuations(store, jnp.array([[context]]), jnp.array([[2]]), 1)
    assert int(counts_BD1[0, 0, 0]) == max(followers.values()) == followers[int(tokens_BD1[0, 0, 0])]
    ctx = types.SimpleNamespace(tokens_BN=jnp.array([[6]]), num_tokens_B=jnp.array([1]))
    state = drafter.init(None, None, Prefill(None, None, jnp.array([[5]]), jnp.array([1]), None), None)
    _, drafts_BM, _ = NgramDraft(store=store).propose(ctx, store, state, None, TokenTree((1,)), GREEDY, None)
    assert int(drafts_BM[0, 0]) == int(tokens_BD1[0, 0, 0])


# ---------------------------------------------------------------------------------------------------------------------
# Caches after verification.

def test_caches_after_speculation_equal_never_having_drafted():
    """After a few tree steps on a hybrid model, the target's cache equals a prefill of the prompt and every
    emitted token but the newest, and the draft model's cache a prefill of what it has seen."""
    model = _linear_model("lightning,softmax")
    params = _init(model)
    draft_params = _perturbed(params)
    prompts = PROMPTS[:2]
    sampler = Sampler(model, params, None, SamplerConfig(max_new_tokens=40, prompt_buckets=(8,)),
                      Speculative(SpeculativeConfig((2, 2, 1), SamplingConfig(temperature=1.0)),
                                  DraftModel(model, draft_params)))
    state = sampler.decode(sampler.prefill(prompts, seed=4), max_steps=5)
    emitted = [row[:n] for row, n in zip(np.asarray(state.tokens_BN).tolist(), np.asarray(state.num_tokens_B))]
    spec = state.strategy

    def prefilled(p, sequences, capacity, window):
        tokens_BT = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
        for row, seq in enumerate(sequences):
            tokens_BT[row, :len(seq)] = seq
        cache = model.init_cache(len(sequences), capacity, window)
        return model.apply({"params": p}, jnp.asarray(tokens_BT), cache, jnp.array([len(s) for s in sequences]))[1]

    def assert_equal(cache, expected, rows):
        lengths = np.asarray(expected.lengths_B)
        np.testing.assert_array_equal(np.asarray(cache.lengths_B)[:rows], lengths)
        for layer, expected_layer in zip(cache.layers, expected.layers):
            if isinstance(layer, KVCache):
                for row in range(rows):
                    np.testing.assert_allclose(layer.k_BKSH[row, :, :lengths[row]],
                                               expected_layer.k_BKSH[row, :, :lengths[row]], atol=1e-4)
            else:
                np.testing.assert_allclose(layer.state_BHDE[:rows], expected_layer.state_BHDE, rtol=1e-3, atol=1e-3)

    target_seen = [p + e[:-1] for p, e in zip(prompts, emitted)]
    assert_equal(spec.cache, prefilled(params, target_seen, spec.cache.capacity, 0), len(prompts))
    unseen = 1 + np.asarray(spec.draft.has_leaf_B)
    draft_seen = [p + e[:len(e) - u] for p, e, u in zip(prompts, emitted, unseen)]
    assert_equal(spec.draft.cache, prefilled(draft_params, draft_seen, spec.cache.capacity, 0), len(prompts))
    assert int(np.sum(spec.accepted_B[:2])) > 0


# ---------------------------------------------------------------------------------------------------------------------
# Bad input.

def test_bad_input_gets_one_line():
    model = _linear_model("softmax")
    params = _init(model)
    other_vocab = Model(Config(vocab_size=VOCAB + 1, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=2,
                               head_dim=8, mlp_dim=32))
    cases = [
        (lambda: SpeculativeConfig.chain(0), "gamma"),
        (lambda: SpeculativeConfig(branching=()), "branching"),
        (lambda: SpeculativeConfig((2, 0)), "branching"),
        (lambda: SpeculativeConfig(sampling=SamplingConfig(temperature=1.0, repetition_penalty=1.2)),
         "repetition_penalty"),
        (lambda: Sampler(model, params, None, SamplerConfig(max_new_tokens=4),
                         Speculative(SpeculativeConfig(), DraftModel(other_vocab, _init(other_vocab)))),
         "vocab_size"),
        (lambda: Sampler(model, params, None, SamplerConfig(max_new_tokens=4, cache_len=8),
                         Speculative(SpeculativeConfig((3, 3)), NgramDraft())), "does not fit"),
    ]
    for make, match in cases:
        with pytest.raises(InputError, match=match) as error:
            make()
        assert "\n" not in str(error.value)
