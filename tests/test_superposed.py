"""Superposed Decoding against a plain-Python transcription of the reference loop, greedy, and its input rules;
the draft metrics against hand-computed values."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm
from errors import InputError
from metrics import drafts
from models import llama
from parallel import mesh as mesh_lib
from samplers import ngram_store
from samplers.engine import Sampler, SamplerConfig
from samplers.superposed import Superposed, SuperposedConfig

VOCAB = 48
ORDERS = (2, 3, 4)
WEIGHTS = (0.05, 0.15, 0.3)


@pytest.fixture(scope="module")
def model_and_params():
    model = llama.Model(llama.Config(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=1,
                                     head_dim=16, mlp_dim=64, max_seq_len=256))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    # Larger embeddings than the init's 0.02 make the logits (and so the candidates) depend on the input.
    params = mesh_lib.strip_logical_names(params)
    params["embedding"] = params["embedding"] * 40
    return model, params


@pytest.fixture(scope="module")
def corpus():
    # A sparse random Markov chain: each token has 8 successors, so n-grams support some candidates and not others.
    rng = np.random.default_rng(0)
    successors = rng.integers(0, VOCAB, size=(VOCAB, 8))
    docs = []
    for _ in range(40):
        doc = [int(rng.integers(VOCAB))]
        for _ in range(60):
            doc.append(int(successors[doc[-1], rng.integers(8)]))
        docs.append(np.array(doc))
    return docs


@pytest.fixture(scope="module")
def store(corpus):
    return ngram_store.build_ngram_store(corpus, ORDERS, vocab_size=VOCAB)


def _prompts(corpus):
    return [list(corpus[0][:7]), list(corpus[1][:3]), list(corpus[2][5:16])]


MAX_NEW = 6


def _config(**overrides):
    return SuperposedConfig(**{**dict(num_drafts=3, alpha=0.54, temperature=0.5, ngram_orders=ORDERS,
                                      ngram_weights=WEIGHTS), **overrides})


def _sampler(model, params, config, store=None, max_new_tokens=MAX_NEW, stop_tokens=(), **kwargs):
    """Superposed Decoding as a strategy of the decode engine, which owns the budget and the stop tokens."""
    return Sampler(model, params, None, SamplerConfig(max_new_tokens, stop_tokens=stop_tokens),
                   Superposed(config, store), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# The reference loop (superposed_generation.py + superpose.py), one prompt at a time, with dict n-grams and a fresh
# full forward (no cache) per step, each position's input the superposition of its K tokens.

def _dict_ngrams(docs, orders):
    tables = {n - 1: collections.defaultdict(collections.Counter) for n in orders}
    for doc in docs:
        doc = [int(t) for t in doc]
        for e in range(1, len(doc)):
            for k, table in tables.items():
                if e >= k:
                    table[tuple(doc[e - k:e])][doc[e]] += 1
    return tables


def _ngram_logp(tables, history, token, orders, weights):
    p = 0.0
    for n, w in zip(orders, weights):
        following = tables[n - 1].get(tuple(history[len(history) - n + 1:])) if len(history) >= n - 1 else None
        if following:
            p += w * following[token] / sum(following.values())
    return math.log(p) if p > 0 else -math.inf


_REFERENCE_LEN = 32


def _reference(forward, prompt, config, tables, stop_tokens):
    k, m, alpha = config.num_drafts, config.m, config.alpha
    inputs = [([t] * k, [1.0] + [0.0] * (k - 1)) for t in prompt]
    alive, finished = [([], 0.0)], []
    for _ in range(MAX_NEW):
        # Right-padded to a fixed length, so the forward compiles once; causal attention ignores the padding.
        padded = inputs + [([0] * k, [0.0] * k)] * (_REFERENCE_LEN - len(inputs))
        logits_V = forward(jnp.array([[t for t, _ in padded]]), jnp.array([[w for _, w in padded]]))[0, len(inputs) - 1]
        logp_V = np.asarray(jax.nn.log_softmax(logits_V / config.temperature), np.float64)
        top_M = np.argsort(-logp_V, kind="stable")[:m]
        lm_M = logp_V[top_M] - np.log(np.exp(logp_V[top_M]).sum())
        grown = []
        for seq, score in alive:
            if alpha > 0:
                ngram_M = np.array([_ngram_logp(tables, prompt + seq, int(v), config.ngram_orders,
                                                config.ngram_weights) for v in top_M])
                if np.isfinite(ngram_M).any():
                    step_M = np.where(np.isfinite(ngram_M), (1 - alpha) * lm_M + alpha * ngram_M, -np.inf)
                else:
                    step_M = (1 - alpha) * lm_M - config.no_support_penalty
            else:
                step_M = lm_M
            grown += [(seq + [int(v)], score + s) for v, s in zip(top_M, step_M) if np.isfinite(s)]
        grown = sorted(grown, key=lambda c: -c[1])[:2 * k]
        finished = sorted(finished + [c for c in grown if c[0][-1] in stop_tokens], key=lambda c: -c[1])[:k]
        alive = [c for c in grown if c[0][-1] not in stop_tokens][:k]
        if not alive:
            break
        scores = np.array([s for _, s in alive])
        gamma = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        inputs.append(([seq[-1] for seq, _ in alive] + [0] * (k - len(alive)),
                       list(gamma) + [0.0] * (k - len(alive))))
    best = sorted(alive + finished, key=lambda c: -c[1] / len(c[0]))[:k]
    return [seq for seq, _ in best], [score for _, score in best]


@pytest.mark.parametrize("stop_tokens", [(), "frequent"])
def test_matches_reference_loop(model_and_params, corpus, store, stop_tokens):
    model, params = model_and_params
    if stop_tokens == "frequent":  # tokens the drafts pick often, so some drafts finish early
        stop_tokens = tuple(int(t) for t in np.bincount(np.concatenate(corpus), minlength=VOCAB).argsort()[-3:])
    config = _config()
    prompts = _prompts(corpus)
    output = _sampler(model, params, config, store, stop_tokens=stop_tokens).generate_tokens(prompts)
    tables = _dict_ngrams(corpus, ORDERS)
    forward = jax.jit(lambda t, w: model.apply({"params": params}, t, token_weights_BTK=w)[0])
    finished_early = 0
    for prompt, tokens, scores in zip(prompts, output.tokens, output.scores):
        want_tokens, want_scores = _reference(forward, prompt, config, tables, stop_tokens)
        assert tokens == want_tokens
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-3)
        finished_early += sum(len(t) < MAX_NEW for t in tokens)
    assert not stop_tokens or finished_early > 0


def test_k1_alpha0_is_greedy(model_and_params, corpus):
    model, params = model_and_params
    prompts = _prompts(corpus)
    superposed = _sampler(model, params, _config(num_drafts=1, alpha=0.0), max_new_tokens=8)
    greedy = Sampler(model, params, None, SamplerConfig(max_new_tokens=8)).generate_tokens(prompts)
    assert [drafts_[0] for drafts_ in superposed.generate_tokens(prompts).tokens] == greedy.tokens


def test_same_last_token_superposition_is_plain_embedding(model_and_params):
    model, params = model_and_params
    prompt_BT = jnp.array([[3, 4, 5, 6], [7, 8, 9, 9]])
    cache = model.init_cache(2, 16)
    _, cache = model.apply({"params": params}, prompt_BT, cache, jnp.array([4, 3]))
    gamma_B1K = jax.nn.softmax(jnp.array([[[0.3, -1.0, 2.0]], [[5.0, 0.0, 0.1]]]), axis=-1)
    last_B1K = jnp.array([[[11, 11, 11]], [[2, 2, 2]]])
    superposed_B1V, _ = model.apply({"params": params}, last_B1K, cache, token_weights_BTK=gamma_B1K)
    plain_B1V, _ = model.apply({"params": params}, last_B1K[:, :, 0], cache)
    np.testing.assert_allclose(superposed_B1V, plain_B1V, rtol=1e-5, atol=1e-5)


def test_drafts_distinct_sorted_and_stop_tokens_end_them(model_and_params, corpus, store):
    model, params = model_and_params
    stop = tuple(int(t) for t in np.bincount(np.concatenate(corpus), minlength=VOCAB).argsort()[-3:])
    sampler = _sampler(model, params, _config(num_drafts=4), store, stop_tokens=stop)
    output = sampler.generate_tokens(_prompts(corpus))
    for tokens, scores in zip(output.tokens, output.scores):
        assert len(tokens) == 4 and len({tuple(t) for t in tokens}) == 4
        per_token = [s / len(t) for t, s in zip(tokens, scores)]
        assert per_token == sorted(per_token, reverse=True)
        for t in tokens:
            assert not set(t[:-1]) & set(stop)  # a stop token only ever ends a draft
            assert len(t) == MAX_NEW or t[-1] in stop
    # Static k and m: a second batch in the same bucket reuses both compilations.
    sampler.generate_tokens(_prompts(corpus)[::-1])
    assert sampler.trace_count == 2


def test_sharded_matches_unsharded(model_and_params, corpus, store):
    model, params = model_and_params
    config = lm.get_config("tiny")
    mesh = mesh_lib.make_mesh_for_present_devices(config.mesh)
    rules = mesh_lib.axis_rules(config)
    prompts = _prompts(corpus)
    sharded = _sampler(model, params, _config(), store, mesh=mesh, rules=rules)
    plain = _sampler(model, params, _config(), store)
    assert sharded.generate_tokens(prompts).tokens == plain.generate_tokens(prompts).tokens


@pytest.mark.parametrize("overrides, setting", [
    (dict(num_drafts=0), "superposed.num_drafts"),
    (dict(num_candidates=2), "superposed.num_candidates"),
    (dict(alpha=1.5), "superposed.alpha"),
    (dict(alpha=-0.1), "superposed.alpha"),
    (dict(temperature=0.0), "superposed.temperature"),
    (dict(temperature=-1.0), "superposed.temperature"),
    (dict(ngram_weights=(0.1, 0.2)), "superposed.ngram_weights"),
    (dict(ngram_orders=(3, 2, 4)), "superposed.ngram_orders"),
])
def test_bad_config(overrides, setting):
    with pytest.raises(InputError, match=setting) as error:
        _config(**overrides)
    assert "\n" not in str(error.value)


def test_missing_store(model_and_params, tmp_path, store):
    model, params = model_and_params
    with pytest.raises(InputError, match="build_ngrams.py") as error:
        _sampler(model, params, _config())
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="build_ngrams.py"):
        ngram_store.load_ngram_store(str(tmp_path / "ngrams.npz"))
    with pytest.raises(InputError, match="superposed.ngram_orders"):
        _sampler(model, params, _config(ngram_orders=(2, 5), ngram_weights=(0.1, 0.1)), store)


# ---------------------------------------------------------------------------------------------------------------------
# Draft metrics.

def test_sentence_bleu_matches_nltk_values():
    assert drafts.sentence_bleu([[1, 2, 3, 4, 5]], [1, 2, 3, 4, 5]) == pytest.approx(1.0)
    assert drafts.sentence_bleu([[1, 2, 3]], [7, 8, 9]) == 0.0
    # Hand-computed as nltk does: p1 = 3/4, p2 = 1/3, p3 = 0 -> 0.1/2, p4 = 0 -> 0.1/1; hypothesis as long as the
    # reference, so no brevity penalty.
    want = math.exp((math.log(3 / 4) + math.log(1 / 3) + math.log(0.1 / 2) + math.log(0.1 / 1)) / 4)
    assert drafts.sentence_bleu([[1, 2, 5, 3]], [1, 2, 3, 4]) == pytest.approx(want)
    # Shorter than the closest reference (length 6 vs 3): brevity penalty exp(1 - 6/3).
    assert drafts.sentence_bleu([[1, 2, 3, 9, 9, 9]], [1, 2, 3]) == pytest.approx(
        math.exp(1 - 2) * math.exp((math.log(1) + math.log(1) + math.log(1) + math.log(0.1)) / 4))
    assert drafts.self_bleu([[1, 2, 3, 4]]) is None
    assert drafts.self_bleu([[1, 2, 3, 4], [1, 2, 3, 4]]) == pytest.approx(1.0)


def test_distinct_precision_and_matching():
    assert drafts.distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert drafts.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert drafts.distinct_n([[1]], 2) is None
    assert drafts.matches_line("  return x\n    y = 2", "return x") and not drafts.matches_line("return", "return x")
    matches = [[False, True, False], [False, False, False], [True, False, False]]
    assert [drafts.precision_at(matches, j) for j in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 2 / 3])


def test_continuation_nll_matches_direct_log_probs(model_and_params):
    model, params = model_and_params
    prompts, continuations = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]]
    nll = drafts.continuation_nll(model, params, prompts, continuations)
    for prompt, continuation, value in zip(prompts, continuations, nll):
        tokens = prompt + continuation
        logits_TV = model.apply({"params": params}, jnp.array([tokens]))[0][0]
        log_probs = jax.nn.log_softmax(logits_TV, axis=-1)
        want = -np.mean([log_probs[t - 1, tokens[t]] for t in range(len(prompt), len(tokens))])
        assert value == pytest.approx(float(want), rel=1e-4)
