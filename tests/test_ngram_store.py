"""The sorted-array n-gram store against a pure-Python dict model built the way the reference's make_corpus.py does."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import InputError
from samplers import ngram_store

ORDERS = ngram_store.DEFAULT_ORDERS
WEIGHTS = ngram_store.REFERENCE_WEIGHTS


class DictNgrams:
    """{context tuple: {token: count}} per context length, counted per document like make_corpus.create_corpuses."""

    def __init__(self, docs, orders):
        self.orders = orders
        self.tables = {n - 1: collections.defaultdict(collections.Counter) for n in orders}
        for doc in docs:
            doc = [int(t) for t in doc]
            for e in range(1, len(doc)):
                for k, table in self.tables.items():
                    if e >= k:
                        table[tuple(doc[e - k:e])][doc[e]] += 1

    def prob(self, context, token):
        """NGram.prob: count(context, token) / count(context, .), or -1 for an unseen context."""
        following = self.tables[len(context)].get(tuple(context))
        return following[token] / sum(following.values()) if following else -1

    def log_prob(self, history, token, weights):
        """Superpose.ngram_probs for one draft and candidate, then log; returns (logp, supported)."""
        p = 0.0
        for n, w in zip(self.orders, weights):
            k = n - 1
            if k <= len(history):
                prob = self.prob(history[len(history) - k:], token)
                if prob >= 0:
                    p += w * prob
        return (math.log(p) if p > 0 else -math.inf), p > 0


def _corpus(rng, num_docs=30, vocab=6):
    # A small vocabulary makes long contexts recur, so every order has seen and unseen cases.
    return [rng.integers(0, vocab, size=rng.integers(0, 40)) for _ in range(num_docs)]


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    docs = _corpus(rng)
    return docs, ngram_store.build_ngram_store(docs, ORDERS), DictNgrams(docs, ORDERS)


def _random_histories(rng, docs, B, D, T, M, vocab):
    """Histories mixing corpus snippets (seen contexts) and random tokens, with lengths 0..T."""
    history_BDT = rng.integers(0, vocab + 2, size=(B, D, T))
    length_BD = rng.integers(0, T + 1, size=(B, D))
    for b in range(B):
        for d in range(D):
            doc = docs[rng.integers(len(docs))]
            if rng.random() < 0.7 and len(doc) > 0:
                start = rng.integers(len(doc))
                snippet = doc[start:start + length_BD[b, d]]
                history_BDT[b, d, :len(snippet)] = snippet
                length_BD[b, d] = len(snippet)
    candidates_BDM = rng.integers(0, vocab + 2, size=(B, D, M))
    return history_BDT.astype(np.int32), length_BD.astype(np.int32), candidates_BDM.astype(np.int32)


def test_counts_match_dict_for_every_stored_and_unseen_ngram(corpus):
    docs, store, ref = corpus
    assert store.rows_per_order == tuple(sum(len(f) for f in ref.tables[n - 1].values()) for n in ORDERS)
    assert store.num_tokens == sum(len(d) for d in docs)
    # Every stored (context, token) of order 6 plus unseen tokens after it, queried through a length-5 history.
    pairs = [(ctx, tok) for ctx, following in ref.tables[5].items() for tok in range(8)]
    history_BDT = np.array([[list(ctx) for ctx, _ in pairs]], np.int32)
    candidates_BDM = np.array([[[tok] for _, tok in pairs]], np.int32)
    count_BDMO, context_count_BDMO = map(np.asarray, jax.jit(ngram_store.ngram_counts)(
        store, history_BDT, np.full(history_BDT.shape[:2], 5, np.int32), candidates_BDM))
    for i, (ctx, tok) in enumerate(pairs):
        for o, n in enumerate(ORDERS):
            following = ref.tables[n - 1].get(ctx[5 - (n - 1):], {})
            assert count_BDMO[0, i, 0, o] == following.get(tok, 0), (ctx, tok, n)
            assert context_count_BDMO[0, i, 0, o] == sum(following.values()), (ctx, tok, n)


def test_log_probs_match_reference_interpolation(corpus):
    docs, store, ref = corpus
    rng = np.random.default_rng(1)
    B, D, T, M = 4, 5, 9, 7
    history_BDT, length_BD, candidates_BDM = _random_histories(rng, docs, B, D, T, M, vocab=6)
    logp_BDM, supported_BDM = jax.jit(ngram_store.ngram_log_probs)(
        store, history_BDT, length_BD, candidates_BDM, WEIGHTS)
    want_logp, want_supported = np.zeros((B, D, M)), np.zeros((B, D, M), bool)
    for b, d, m in np.ndindex(B, D, M):
        history = [int(t) for t in history_BDT[b, d, :length_BD[b, d]]]
        want_logp[b, d, m], want_supported[b, d, m] = ref.log_prob(history, int(candidates_BDM[b, d, m]), WEIGHTS)
    np.testing.assert_array_equal(supported_BDM, want_supported)
    np.testing.assert_allclose(logp_BDM, want_logp, rtol=1e-5)
    # The draws must exercise both outcomes and the short-history path.
    assert want_supported.any() and not want_supported.all() and (length_BD < 5).any()


def test_ngrams_do_not_cross_document_boundaries():
    store = ngram_store.build_ngram_store([np.array([1, 2, 3]), np.array([4, 5]), np.array([], np.int32)], (2, 3))
    counts = lambda history, token: [np.asarray(x)[0, 0, 0] for x in jax.jit(ngram_store.ngram_counts)(
        store, np.array([[history]], np.int32), np.array([[len(history)]], np.int32), np.array([[[token]]], np.int32))]
    count, context_count = counts([2, 3], 4)
    np.testing.assert_array_equal(count, [0, 0])  # (3, 4) and (2, 3, 4) span the boundary
    np.testing.assert_array_equal(context_count, [0, 0])  # 3 and (2, 3) end document 1: nothing follows them
    count, context_count = counts([1, 2], 3)
    np.testing.assert_array_equal(count, [1, 1])
    np.testing.assert_array_equal(context_count, [1, 1])
    assert store.rows_per_order == (3, 1)


def test_short_history_skips_long_orders_and_empty_store_supports_nothing():
    store = ngram_store.build_ngram_store([np.array([7, 7, 7, 7, 7, 7, 7])])
    log_probs = jax.jit(ngram_store.ngram_log_probs)
    logp_BDM, supported_BDM = log_probs(
        store, np.full((1, 2, 6), 7, np.int32), np.array([[0, 2]], np.int32), np.full((1, 2, 1), 7, np.int32))
    # No history: no order applies. Two tokens: bigram and trigram contexts apply, each with probability 1.
    np.testing.assert_array_equal(supported_BDM[0, :, 0], [False, True])
    np.testing.assert_allclose(logp_BDM[0, 1, 0], math.log(WEIGHTS[0] + WEIGHTS[1]), rtol=1e-6)
    empty = ngram_store.build_ngram_store([])
    _, supported_BDM = log_probs(
        empty, np.zeros((1, 1, 6), np.int32), np.array([[6]], np.int32), np.zeros((1, 1, 3), np.int32))
    assert not np.asarray(supported_BDM).any()


def test_hash_is_pinned():
    # Stores on disk depend on this exact function; changing it needs a FORMAT_VERSION bump.
    assert ngram_store.hash_context([1, 2, 3]) == (1562797826, 3095088949)


def test_save_load_round_trip(corpus, tmp_path):
    docs, store, _ = corpus
    path = str(tmp_path / "sub" / "ngrams.npz")
    info = ngram_store.build_and_save(docs, path, ORDERS, vocab_size=100)
    loaded = ngram_store.load_ngram_store(path)
    np.testing.assert_array_equal(loaded.key_R3, store.key_R3)
    np.testing.assert_array_equal(loaded.counts_R2, store.counts_R2)
    assert (loaded.orders, loaded.rows_per_order, loaded.num_tokens, loaded.vocab_size) == (
        store.orders, store.rows_per_order, store.num_tokens, 100)
    assert info["file_bytes"] > 0 and info["rows_per_order"] == dict(zip(ORDERS, store.rows_per_order))


def test_missing_store_names_the_build_command(tmp_path):
    with pytest.raises(InputError, match="python tools/build_ngrams.py --config=CONFIG --workdir=WORKDIR"):
        ngram_store.load_ngram_store(str(tmp_path / "ngrams.npz"))


@pytest.mark.parametrize("orders", [(), (1, 2), (3, 2), (2, 2)])
def test_bad_orders_are_input_errors(orders):
    with pytest.raises(InputError, match="orders"):
        ngram_store.build_ngram_store([np.arange(5)], orders)


def test_store_is_a_pytree_with_static_metadata(corpus):
    _, store, _ = corpus
    leaves, treedef = jax.tree.flatten(jax.device_put(store))
    assert len(leaves) == 3 and all(isinstance(x, jax.Array) for x in leaves)
    assert jax.tree.unflatten(treedef, leaves).orders == ORDERS
    assert jnp.asarray(store.key_R3).dtype == jnp.uint32  # no x64 needed
