"""Token trees through the model (models/token_tree.py): every node's logits equal those of its root-to-node path
decoded as a chain, keeping one path leaves the caches exactly as decoding that path would, and a tree written
level by level equals the tree written at once; on softmax, lightning and hybrid models."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import token_tree
from models.kv_cache import KVCache
from models.linear_state import LinearState
from models.llama import Config, Model
from models.token_tree import TokenTree

VOCAB = 48
PROMPTS = [[5, 6, 7, 8], [9, 10]]
TREE = TokenTree((2, 2, 1))  # 1 + 2 + 4 + 4 = 11 nodes


def _model(mixer_pattern):
    model = Model(Config(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                         mlp_dim=64, max_seq_len=64, mixer_pattern=mixer_pattern, lightning_block_size=8))
    params = nn.meta.unbox(model.init(jax.random.key(0), *model.example_inputs())["params"])
    return model, jax.tree.map(lambda x: 3.0 * x, params)


def _prefilled(model, params, window):
    prompt_BP = jnp.array([p + [0] * (4 - len(p)) for p in PROMPTS])
    lengths_B = jnp.array([len(p) for p in PROMPTS])
    cache = model.init_cache(2, 32, rollback_window=window)
    return model.apply({"params": params}, prompt_BP, cache, lengths_B)[1]


def _tree_tokens():
    return jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (2, TREE.num_nodes)), jnp.int32)


def _path(node):
    parents, path = TREE.parents, [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


@functools.partial(jax.jit, static_argnums=0)
def _chain(model, params, cache, tokens_BL):
    return model.apply({"params": params}, tokens_BL, cache)


@functools.partial(jax.jit, static_argnums=0)
def _tree(model, params, cache, tokens_BN):
    return model.apply({"params": params}, tokens_BN, cache, tree_mask_TN=TREE.ancestor_mask)


def _assert_caches_equal(a, b, lengths_B):
    np.testing.assert_array_equal(a.lengths_B, b.lengths_B)
    for layer_a, layer_b in zip(a.layers, b.layers):
        if isinstance(layer_a, KVCache):
            for x, y in ((layer_a.k_BKSH, layer_b.k_BKSH), (layer_a.v_BKSH, layer_b.v_BKSH)):
                for row, length in enumerate(np.asarray(lengths_B)):
                    np.testing.assert_allclose(x[row, :, :length], y[row, :, :length], rtol=1e-5, atol=1e-4)
        else:
            assert isinstance(layer_a, LinearState)
            np.testing.assert_allclose(layer_a.state_BHDE, layer_b.state_BHDE, rtol=1e-4, atol=1e-4)


def test_token_tree_shape():
    np.testing.assert_array_equal(TREE.parents, [-1, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6])
    assert TREE.level_sizes == (1, 2, 4, 4) and TREE.level_starts == (0, 1, 3, 7)
    assert TREE.ancestor_mask[8].nonzero()[0].tolist() == [0, 1, 4, 8]
    np.testing.assert_array_equal(token_tree.depths(TREE.ancestor_mask), [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    assert TokenTree((1, 1, 1)).is_chain and not TREE.is_chain
    np.testing.assert_array_equal(TokenTree((1, 1, 1)).ancestor_mask, np.tril(np.ones((4, 4), bool)))


@pytest.mark.parametrize("mixer_pattern", [pytest.param("softmax", marks=pytest.mark.slow),
                                           pytest.param("lightning", marks=pytest.mark.slow), "lightning,softmax"])
def test_tree_nodes_equal_their_paths_and_keeping_a_path_equals_decoding_it(mixer_pattern):
    model, params = _model(mixer_pattern)
    cache = _prefilled(model, params, window=TREE.num_nodes)
    tokens_BN = _tree_tokens()
    tree_logits_BNV, tree_cache = _tree(model, params, cache, tokens_BN)
    # Every node lies on a path to a leaf, and a chain's logits at each position are those of its path's nodes.
    leaves = range(TREE.level_starts[-1], TREE.num_nodes)
    for leaf in leaves:
        path = _path(leaf)
        chain_logits_BLV, _ = _chain(model, params, cache, tokens_BN[:, path])
        np.testing.assert_allclose(tree_logits_BNV[:, path], chain_logits_BLV, rtol=1e-4, atol=1e-4)
    assert set(sum((_path(leaf) for leaf in leaves), [])) == set(range(TREE.num_nodes))

    # Row 0 keeps a path to a leaf, row 1 a path to a depth-1 node.
    paths = [_path(9), _path(2)]
    path_BL = jnp.array([p + [0] * (4 - len(p)) for p in paths])
    kept = jax.jit(type(tree_cache).keep_path)(tree_cache, cache.lengths_B, path_BL,
                                                jnp.array([len(p) for p in paths]))
    for row, path in enumerate(paths):
        _, decoded = _chain(model, params, cache, tokens_BN[:, path])
        row_of = jax.tree.map(lambda x: x[row:row + 1] if getattr(x, "ndim", 0) else x, (kept, decoded))
        _assert_caches_equal(*row_of, np.asarray(decoded.lengths_B[row:row + 1]))
    # The next token after the kept path sees exactly that path.
    next_B1 = jnp.array([[3], [4]])
    logits_after_keep, _ = _chain(model, params, kept, next_B1)
    for row, path in enumerate(paths):
        expected, _ = _chain(model, params, cache, jnp.concatenate([tokens_BN[:, path], next_B1], axis=1))
        np.testing.assert_allclose(logits_after_keep[row, 0], expected[row, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer_pattern", [pytest.param("softmax", marks=pytest.mark.slow), "lightning,softmax"])
def test_a_tree_written_level_by_level_equals_one_written_at_once(mixer_pattern):
    """A draft model's tree hangs below a root it already consumed: the forest of its descendants is written a
    level at a time, each call passing its nodes' rows of the forest mask."""
    model, params = _model(mixer_pattern)
    cache = _prefilled(model, params, window=TREE.num_nodes)
    tokens_BN = _tree_tokens()
    once_logits_BNV, _ = _tree(model, params, cache, tokens_BN)

    root_logits, cache = _chain(model, params, cache, tokens_BN[:, :1])
    np.testing.assert_allclose(root_logits[:, 0], once_logits_BNV[:, 0], rtol=1e-4, atol=1e-4)
    forest_mask = TREE.ancestor_mask[1:, 1:]
    for start, size in zip(TREE.level_starts[1:], TREE.level_sizes[1:]):
        rows = slice(start - 1, start - 1 + size)
        level_logits, cache = model.apply({"params": params}, tokens_BN[:, start:start + size], cache,
                                          tree_mask_TN=forest_mask[rows, :start - 1 + size])
        np.testing.assert_allclose(level_logits, once_logits_BNV[:, start:start + size], rtol=1e-4, atol=1e-4)


def test_linear_state_rolls_back_across_writes():
    """The window keeps the last rollback_window tokens whatever writes they came in: dropping 5 tokens written
    as 2 + 1 + 3 after 6 others equals never having written them."""
    model, params = _model("lightning")
    cache = _prefilled(model, params, window=6)
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, VOCAB, (2, 12)), jnp.int32)
    _, base = _chain(model, params, cache, tokens[:, :7])
    extended = base
    for a, b in ((7, 9), (9, 10), (10, 12)):
        _, extended = _chain(model, params, extended, tokens[:, a:b])
    _assert_caches_equal(extended.rollback(base.lengths_B), base, base.lengths_B)
