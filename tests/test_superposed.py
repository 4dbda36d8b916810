"""Superposed Decoding against a numpy float32 transcription of the reference loop, greedy, and its input rules;
the draft metrics against hand-computed values."""

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from configs import lm
from data import tokenizer as tokenizer_lib
from errors import InputError
from evaluators import superposed as evaluators_superposed
from metrics import drafts
from models import llama
from parallel import mesh as mesh_lib
from samplers import ngram_store
from samplers.engine import Sampler, SamplerConfig
from samplers.superposed import REFERENCE, Superposed, SuperposedConfig, candidates

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
# The reference loop (superposed_generation.py + superpose.py) in numpy float32 as the reference computes it, one
# prompt at a time, with dict n-grams and a fresh full forward (no cache) per step, each position's input the
# superposition of its K tokens.

def _dict_ngrams(docs, orders):
    tables = {n - 1: collections.defaultdict(collections.Counter) for n in orders}
    for doc in docs:
        doc = [int(t) for t in doc]
        for e in range(1, len(doc)):
            for k, table in tables.items():
                if e >= k:
                    table[tuple(doc[e - k:e])][doc[e]] += 1
    return tables


def _ngram_prob(tables, history, token, orders, weights):
    """Superpose.ngram_probs for one token: a float32 sum over the orders whose context was seen (NGram.prob is -1
    for an unseen one) of weight * count / total, each term formed in float64 as Python does. (The reference's buffer
    is float16 there, a side effect of its torch.set_default_tensor_type(HalfTensor) that decodelab does not copy.)"""
    p = np.float32(0)
    for n, w in zip(orders, weights):
        following = tables[n - 1].get(tuple(history[len(history) - n + 1:])) if len(history) >= n - 1 else None
        if following is not None:
            p += np.float32(w * following[token] / sum(following.values()))
    return p


_REFERENCE_LEN = 32


def _reference(forward, prompt, config, tables, stop_tokens):
    k, m = config.num_drafts, config.num_candidates
    alpha, one_minus_alpha = np.float32(config.alpha), np.float32(1 - config.alpha)
    inputs = [([t] * k, [1.0] + [0.0] * (k - 1)) for t in prompt]
    alive, finished = [([], np.float32(0))], []
    for _ in range(MAX_NEW):
        # Right-padded to a fixed length, so the forward compiles once; causal attention ignores the padding.
        padded = inputs + [([0] * k, [0.0] * k)] * (_REFERENCE_LEN - len(inputs))
        logits_V = np.asarray(forward(jnp.array([[t for t, _ in padded]]), jnp.array([[w for _, w in padded]]))[
            0, len(inputs) - 1], np.float32)
        # torch.softmax(logits / temp) in float32; numpy keeps subnormals, as CUDA does.
        z_V = logits_V / np.float32(config.temperature)
        e_V = np.exp(z_V - z_V.max())
        probs_V = e_V / e_V.sum()
        top_M = np.argsort(-probs_V, kind="stable")[:m]  # get_top_k: the top m, renormalised
        p_hat_M = probs_V[top_M] / probs_V[top_M].sum()
        with np.errstate(divide="ignore"):
            lm_M = np.log(p_hat_M)
            grown = []
            for seq, score in alive:
                if config.alpha > 0:
                    # Only tokens of nonzero probability are looked up (`nz`); the others stay 0.
                    ngram_M = np.array([_ngram_prob(tables, prompt + seq, int(v), config.ngram_orders,
                                                    config.ngram_weights) if p > 0 else 0
                                        for v, p in zip(top_M, p_hat_M)], np.float32)
                    step_M = one_minus_alpha * lm_M + alpha * np.log(ngram_M)
                    if not np.isfinite(step_M).any():
                        step_M = one_minus_alpha * lm_M - np.float32(config.no_support_penalty)
                else:
                    step_M = lm_M
                grown += [(seq + [int(v)], score + s) for v, s in zip(top_M, step_M) if np.isfinite(s)]
        grown = sorted(grown, key=lambda c: -c[1])[:2 * k]
        finished = sorted(finished + [c for c in grown if c[0][-1] in stop_tokens], key=lambda c: -c[1])[:k]
        alive = [c for c in grown if c[0][-1] not in stop_tokens][:k]
        if not alive:
            break
        # log_prob_to_prob: softmax of the scores plus their max, in float32.
        scores = np.array([s for _, s in alive], np.float32)
        scores = scores + scores.max()
        gamma = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        inputs.append(([seq[-1] for seq, _ in alive] + [0] * (k - len(alive)),
                       list(gamma) + [0.0] * (k - len(alive))))
    best = sorted(alive + finished, key=lambda c: -c[1] / len(c[0]))[:k]
    return [seq for seq, _ in best], [float(score) for _, score in best]


def _check_against_reference(model, params, config, store, corpus, stop_tokens=()):
    """Superposed's drafts of _prompts(corpus) equal the reference loop's; returns them."""
    prompts = _prompts(corpus)
    output = _sampler(model, params, config, store, stop_tokens=stop_tokens).generate_tokens(prompts)
    tables = _dict_ngrams(corpus, config.ngram_orders)
    forward = jax.jit(lambda t, w: model.apply({"params": params}, t, token_weights_BTK=w)[0])
    for prompt, tokens, scores in zip(prompts, output.tokens, output.scores):
        want_tokens, want_scores = _reference(forward, prompt, config.resolved(), tables, stop_tokens)
        assert tokens == want_tokens
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-3)
    return output


@pytest.mark.parametrize("stop_tokens", [(), "frequent"])
def test_matches_reference_loop(model_and_params, corpus, store, stop_tokens):
    model, params = model_and_params
    if stop_tokens == "frequent":  # tokens the drafts pick often, so some drafts finish early
        stop_tokens = tuple(int(t) for t in np.bincount(np.concatenate(corpus), minlength=VOCAB).argsort()[-3:])
    output = _check_against_reference(model, params, _config(), store, corpus, stop_tokens)
    assert not stop_tokens or sum(len(t) < MAX_NEW for drafts_ in output.tokens for t in drafts_) > 0


def test_matches_reference_float32_at_its_defaults(model_and_params, corpus):
    """The reference's own settings (p15_d3_mixed.json: T 0.06, m 9, bigram..6-gram with its weights). At T 0.06 only
    a few of the top 9 have a nonzero float32 probability, and the reference never scores the others; the log-space
    variant keeps them finite and lets the n-grams pick them, so its drafts differ from the reference's here."""
    model, params = model_and_params
    # Embeddings at half the fixture's scale: some steps keep several candidates, others one.
    params = {**params, "embedding": params["embedding"] / 2}
    config = SuperposedConfig()
    assert (config.resolved().temperature, config.resolved().num_candidates, config.ngram_orders) == (
        0.06, 9, (2, 3, 4, 5, 6))
    store = ngram_store.build_ngram_store(corpus, config.ngram_orders, vocab_size=VOCAB)
    output = _check_against_reference(model, params, config, store, corpus)
    assert max(len(drafts_) for drafts_ in output.tokens) == 3
    log_space = _sampler(model, params, dataclasses.replace(config, log_space_candidates=True), store)
    assert log_space.generate_tokens(_prompts(corpus)).tokens != output.tokens


def test_candidates_are_the_reference_float32_probabilities():
    """get_top_k(torch.softmax(logits / 0.06)) in float32: 5.5 logits below the top a probability is subnormal (kept,
    as CUDA and numpy keep it), 6.5 below it is 0 (log -inf), however the n-grams rate the token."""
    logits_V = np.array([0.0, -1.0, -5.5, -6.5, -20.0, 0.3, -3.0, -6.0, -9.0, -40.0, -2.0, -6.3], np.float32)
    config = SuperposedConfig().resolved()
    z_V = logits_V / np.float32(config.temperature)
    probs_V = np.exp(z_V - z_V.max()) / np.exp(z_V - z_V.max()).sum()
    top_M = np.argsort(-probs_V, kind="stable")[:config.num_candidates]
    with np.errstate(divide="ignore"):
        want_M = np.log(probs_V[top_M] / probs_V[top_M].sum())
    assert 0 < probs_V[2] < np.finfo(np.float32).tiny and probs_V[3] == 0
    lm_1M, candidates_1M = candidates(config, jnp.asarray(logits_V)[None])
    # Tokens of probability 0 tie, so which of them fill the m is arbitrary; they are never scored.
    kept = int(np.isfinite(want_M).sum())
    assert kept == 6 and candidates_1M[0, :kept].tolist() == top_M[:kept].tolist()
    np.testing.assert_allclose(lm_1M[0], want_M, rtol=1e-5)  # equal infinities, finite values close
    # The log-space variant keeps every top-m token finite.
    log_space_1M, _ = candidates(dataclasses.replace(config, log_space_candidates=True), jnp.asarray(logits_V)[None])
    assert np.isfinite(log_space_1M).all()


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
    (dict(temperature=-2.0), "superposed.temperature"),
    (dict(num_candidates=0), "superposed.num_candidates"),
    (dict(log_space_candidates=1), "superposed.log_space_candidates"),
    (dict(ngram_weights=(0.1, 0.2)), "superposed.ngram_weights"),
    (dict(ngram_orders=(3, 2, 4)), "superposed.ngram_orders"),
])
def test_bad_config(overrides, setting):
    with pytest.raises(InputError, match=setting) as error:
        _config(**overrides)
    assert "\n" not in str(error.value)


def test_unset_settings_take_the_reference_params_for_k():
    """alpha, temperature and m left at REFERENCE come from the reference's params/p15_d{k}_mixed.json; a k it has no
    file for takes k = 3's alpha and temperature; m is 3k; a value given is kept."""
    files = {2: (0.62, 0.06, 6), 3: (0.54, 0.06, 9), 4: (0.52, 0.06, 12), 5: (0.6, 0.06, 15), 6: (0.52, 0.06, 18),
             10: (0.54, 0.12, 30), 7: (0.54, 0.06, 21), 1: (0.54, 0.06, 3)}
    for k, want in files.items():
        config = SuperposedConfig(num_drafts=k)
        assert (config.alpha, config.temperature, config.num_candidates) == (REFERENCE,) * 3
        resolved = config.resolved()
        assert (resolved.alpha, resolved.temperature, resolved.num_candidates) == want, k
        assert Superposed(config).config == resolved
    given = SuperposedConfig(num_drafts=10, alpha=0.0, num_candidates=12).resolved()
    assert (given.alpha, given.temperature, given.num_candidates) == (0.0, 0.12, 12)
    # The evaluator's section is built from the defaults, so a k set there gets its own params too.
    section = lm.get_config("tiny").evaluate.superposed
    section.num_drafts = 5
    assert evaluators_superposed.method_config(section).resolved().alpha == 0.6


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

def test_next_line_prompts_start_with_bos_where_the_tokenizer_adds_one():
    text = "".join(f"def f{i}(x):\n    y = x + {i}\n    return y * {i}\n\n" for i in range(12))
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    bos = tokenizer.token_to_id("<s>")
    for adds_bos in (False, True):
        if adds_bos:
            tokenizer.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A",
                                                                               special_tokens=[("<s>", bos)])
        assert tokenizer_lib.bos_ids(tokenizer) == ([bos] if adds_bos else [])
        prompts = drafts.next_line_prompts(tokenizer, [text], prefix_tokens=8, max_line_tokens=10, num_prompts=4)
        assert len(prompts) == 4
        for prompt in prompts:
            tokens = prompt["prompt_tokens"]
            assert len(tokens) == 8 and (tokens[0] == bos) == adds_bos and bos not in tokens[1:]
            # The text tokens are the ones right before the true next line.
            assert tokenizer.decode(tokens[adds_bos:]) + prompt["next_line"] + "\n" in text


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
