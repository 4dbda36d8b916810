"""The Llama decoder: cached decoding reproduces the full forward; remat and the attention switch change nothing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from errors import InputError
from models import registry
from models.llama import Config, Model

TINY = dict(vocab_size=97, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
TINY_UNTIED = dict(tie_embeddings=False)


def init(model, tokens_BT):
    return nn.meta.unbox(model.init(jax.random.key(1), tokens_BT)["params"])


def tokens(batch=3, length=12, vocab=97, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


LIGHTNING = dict(mixer_pattern="lightning", lightning_block_size=8)
HYBRID = dict(mixer_pattern="lightning,softmax", lightning_block_size=8)
VARIANTS = {
    "reference": dict(softmax_implementation="reference"),
    "xla": dict(softmax_implementation="xla"),
    "pallas": dict(softmax_implementation="pallas"),
    "qwen-like": dict(qkv_bias=True, qk_norm=True, tie_embeddings=False),
    "lightning": LIGHTNING,
    "lightning-pallas": dict(LIGHTNING, lightning_implementation="pallas", lightning_decode_implementation="pallas"),
    "hybrid": HYBRID,
    "hybrid-pallas": dict(HYBRID, softmax_implementation="pallas", lightning_implementation="pallas",
                          lightning_decode_implementation="pallas"),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_cached_decoding_equals_full_forward(variant):
    model = Model(Config(**TINY, **variant))
    tokens_BT = tokens()
    params = init(model, tokens_BT)
    full_BTV, _ = model.apply({"params": params}, tokens_BT)

    # Prefill right-padded prompts of different lengths in one call, then decode one token at a time.
    lengths_B = jnp.array([3, 7, 12])
    prompts_BT = jnp.where(jnp.arange(12)[None] < lengths_B[:, None], tokens_BT, 0)
    cache = model.init_cache(3, 16)
    logits_BTV, cache = model.apply({"params": params}, prompts_BT, cache, lengths_B)
    for b, length in enumerate(lengths_B):
        np.testing.assert_allclose(logits_BTV[b, :length], full_BTV[b, :length], atol=2e-5)
    np.testing.assert_array_equal(cache.lengths_B, lengths_B)

    decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c))
    for _ in range(5):
        positions_B = np.asarray(cache.lengths_B)
        next_B1 = jnp.take_along_axis(tokens_BT, jnp.minimum(cache.lengths_B, 11)[:, None], axis=1)
        step_B1V, cache = decode(params, next_B1, cache)
        for b, position in enumerate(positions_B):
            if position < 12:
                np.testing.assert_allclose(step_B1V[b, 0], full_BTV[b, position], atol=2e-5)


@pytest.mark.parametrize("variant", [dict(), LIGHTNING], ids=["softmax", "lightning"])
def test_ragged_chunks_continue_a_cache(variant):
    """Two ragged multi-token chunks in a row (prefill, then e.g. a speculative block) equal the full forward."""
    model = Model(Config(**TINY, **variant))
    tokens_BT = tokens(length=14)
    params = init(model, tokens_BT)
    full_BTV, _ = model.apply({"params": params}, tokens_BT)
    first_B, second_B = jnp.array([2, 5, 7]), jnp.array([6, 3, 7])
    cache = model.init_cache(3, 16)
    _, cache = model.apply({"params": params}, tokens_BT[:, :7], cache, first_B)
    chunk_BT = jnp.stack([jnp.roll(tokens_BT[b], -int(first_B[b]))[:7] for b in range(3)])
    logits_BTV, cache = model.apply({"params": params}, chunk_BT, cache, second_B)
    for b in range(3):
        start, count = int(first_B[b]), int(second_B[b])
        np.testing.assert_allclose(logits_BTV[b, :count], full_BTV[b, start:start + count], atol=2e-5)
    np.testing.assert_array_equal(cache.lengths_B, first_B + second_B)


def _write_ragged(model, params, cache, chunk_BT, num_new_B):
    return jax.jit(lambda p, t, c, n: model.apply({"params": p}, t, c, n))(params, chunk_BT, cache, num_new_B)


def _assert_caches_close(cache, expected):
    np.testing.assert_array_equal(cache.lengths_B, expected.lengths_B)
    for layer, expected_layer in zip(cache.layers, expected.layers):
        if hasattr(layer, "state_BHDE"):
            np.testing.assert_allclose(layer.state_BHDE, expected_layer.state_BHDE, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(), pytest.param(LIGHTNING, marks=pytest.mark.slow), HYBRID],
                         ids=["softmax", "lightning", "hybrid"])
def test_rollback_then_continue_equals_never_writing(variant):
    """Tokens written, rolled back to per-row lengths, then more tokens: the same logits and states as a cache that
    only ever held the kept tokens; for a chunk, for single-token steps (a draft model's pattern), and across a
    write that overflowed the rollback window (which then starts at that write)."""
    model = Model(Config(**TINY, **variant))
    tokens_BT = tokens(length=24)
    params = init(model, tokens_BT)
    prompt_B, kept_B = jnp.array([3, 5, 4]), jnp.array([0, 6, 2])
    chunk_BT, more_BT = tokens_BT[:, 6:12], tokens_BT[:, 12:16]

    def prefilled(window):
        return _write_ragged(model, params, model.init_cache(3, 32, rollback_window=window), tokens_BT[:, :6],
                             prompt_B)[1]

    # A chunk of 6, rolled back to keep kept_B of it.
    _, written = _write_ragged(model, params, prefilled(8), chunk_BT, jnp.full((3,), 6))
    rolled_back = written.rollback(prompt_B + kept_B)
    _, expected = _write_ragged(model, params, prefilled(8), chunk_BT, kept_B)
    _assert_caches_close(rolled_back, expected)
    logits_BTV, _ = _write_ragged(model, params, rolled_back, more_BT, jnp.full((3,), 4))
    expected_BTV, _ = _write_ragged(model, params, expected, more_BT, jnp.full((3,), 4))
    np.testing.assert_allclose(logits_BTV, expected_BTV, atol=2e-5)

    # Three one-token steps, rolled back by two: as if only the first had been written.
    cache = prefilled(4)
    for t in range(3):
        _, cache = _write_ragged(model, params, cache, chunk_BT[:, t:t + 1], jnp.ones((3,), jnp.int32))
    _, one_step = _write_ragged(model, params, prefilled(4), chunk_BT[:, :1], jnp.ones((3,), jnp.int32))
    _assert_caches_close(cache.rollback(prompt_B + 1), one_step)

    # Window 4: a write of 3 fits; a second write of 3 overflows, so the window restarts there and that write (and
    # only it) can still be rolled back.
    _, cache = _write_ragged(model, params, prefilled(4), chunk_BT[:, :3], jnp.full((3,), 3))
    _, cache = _write_ragged(model, params, cache, chunk_BT[:, 3:], jnp.full((3,), 3))
    _, expected = _write_ragged(model, params, prefilled(4), chunk_BT[:, :4], jnp.full((3,), 4))
    _assert_caches_close(cache.rollback(prompt_B + 4), expected)


def test_flops_per_token_counts_each_mixer():
    """6 FLOPs per matmul weight (the parameters of the real tree) plus the mixing: linear in the sequence length
    for softmax attention, independent of it for linear attention."""
    for variant in (dict(), LIGHTNING, dict(TINY_UNTIED)):
        model = Model(Config(**{**TINY, **variant}))
        params = init(model, tokens())
        matmul_weights = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                             if x.ndim >= 2 and not (path[0].key == "embedding" and not model.config.tie_embeddings))
        cfg = model.config
        if cfg.mixer_pattern == "lightning":
            mixing = cfg.num_layers * 3 * cfg.num_heads * (2 * cfg.lightning_block_size * cfg.head_dim
                                                           + 4 * cfg.head_dim ** 2)
            assert model.flops_per_token(128) == model.flops_per_token(4096) == 6 * matmul_weights + mixing
        else:
            for seq_len in (128, 4096):
                mixing = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
                assert model.flops_per_token(seq_len) == 6 * matmul_weights + mixing


@pytest.mark.parametrize("field, value, message", [
    ("num_heads", 7, "config.model.num_heads=7 must be a multiple of config.model.num_kv_heads=2"),
    ("num_kv_heads", 0, "config.model.num_kv_heads=0 must be an integer >= 1"),
    ("embed_dim", 0, "config.model.embed_dim=0 must be an integer >= 1"),
    ("head_dim", -1, "config.model.head_dim=-1 must be an integer >= 1"),
    ("head_dim", 7, "config.model.head_dim=7 must be even"),
    ("dtype", "float64x", "config.model.dtype='float64x' is not one of 'float32', 'bfloat16', 'float16'"),
    ("remat", "some", "config.model.remat='some' is not one of 'none', 'full', 'dots'"),
    ("softmax_implementation", "flash", "config.model.softmax_implementation='flash' is not one of 'reference'"),
    ("mixer_pattern", "lightning,mamba", "config.model.mixer_pattern='lightning,mamba': 'mamba' is not a mixer"),
    ("lightning_decode_implementation", "cuda", "config.model.lightning_decode_implementation='cuda'"),
    ("norm_eps", 0.0, "config.model.norm_eps=0.0 must be a finite number > 0"),
])
def test_bad_model_config_is_one_line(field, value, message):
    with pytest.raises(InputError) as error:
        Config(**{**TINY, field: value})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_lightning_cache_is_a_constant_size_state():
    model = Model(Config(**TINY, **LIGHTNING))
    assert model.init_cache(2, 16).capacity is None
    shapes = {jnp.shape(x) for x in jax.tree.leaves(model.init_cache(2, 4096))}
    assert shapes == {(2,), (2, 4, 8, 8)}
    hybrid = Model(Config(**TINY, **HYBRID)).init_cache(2, 16)
    assert hybrid.capacity == 16


def test_remat_and_attention_implementations_agree():
    tokens_BT = tokens()
    params = init(Model(Config(**TINY)), tokens_BT)

    def loss_and_grads(**overrides):
        model = Model(Config(**TINY, **overrides))
        loss = lambda p: model.apply({"params": p}, tokens_BT)[0].mean()
        return jax.value_and_grad(loss)(params)

    expected = loss_and_grads(softmax_implementation="reference")
    for overrides in [dict(softmax_implementation="xla"), dict(remat="full"), dict(remat="dots")]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), loss_and_grads(**overrides), expected)


def test_splash_attention_trains_like_the_reference():
    """softmax_implementation="splash" (JAX's TPU kernel, interpreted here) on 128-token sequences: the loss and
    gradients of the reference implementation."""
    tokens_BT = tokens(batch=2, length=128)
    params = init(Model(Config(**TINY)), tokens_BT)

    def loss_and_grads(implementation):
        model = Model(Config(**TINY, softmax_implementation=implementation))
        return jax.value_and_grad(lambda p: model.apply({"params": p}, tokens_BT)[0].mean())(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), loss_and_grads("splash"),
                 loss_and_grads("reference"))


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
    model = Model(Config(**TINY, dtype="bfloat16"))
    tokens_BT = tokens()
    params = init(model, tokens_BT)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    logits_BTV, _ = model.apply({"params": params}, tokens_BT)
    reference_BTV, _ = Model(Config(**TINY)).apply({"params": params}, tokens_BT)
    assert logits_BTV.dtype == jnp.float32
    np.testing.assert_allclose(logits_BTV, reference_BTV, atol=0.05)
    # The bf16 cache path (prefill, then a decode step) agrees with the bf16 full forward.
    cache = model.init_cache(3, 16)
    assert cache.layers[0].k_BKSH.dtype == jnp.bfloat16
    prefill_BTV, cache = model.apply({"params": params}, tokens_BT[:, :-1], cache)
    step_B1V, _ = model.apply({"params": params}, tokens_BT[:, -1:], cache)
    np.testing.assert_allclose(jnp.concatenate([prefill_BTV, step_B1V], axis=1), logits_BTV, atol=0.05)


def test_parameters_carry_logical_axis_names():
    boxed = Model(Config(**TINY)).init(jax.random.key(0), tokens())["params"]
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["embedding"]) == ("vocab", "embed")
    assert tuple(specs["layer_0"]["attention"]["query_kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["layer_1"]["mlp"]["down"]["kernel"]) == ("mlp", "embed")


def test_registry_builds_by_name_and_rejects_unknown_names():
    model_config = ml_collections.ConfigDict(dict(name="llama", **TINY))
    assert isinstance(registry.build(model_config), Model)
    with pytest.raises(InputError, match="config.model.name='gpt9' is not a model; available: .*llama"):
        registry.build(ml_collections.ConfigDict(dict(name="gpt9", **TINY)))
    with pytest.raises(InputError, match="config.model.num_experts is not a field"):
        registry.build(ml_collections.ConfigDict(dict(name="llama", num_experts=4, **TINY)))


def test_superposed_input_is_the_weighted_sum_of_embeddings():
    model = Model(Config(**TINY))
    tokens_BT = tokens(length=4)
    params = init(model, tokens_BT)
    plain_BTV, _ = model.apply({"params": params}, tokens_BT)
    # Every draft ending in the same token: the superposition is that token's own embedding.
    same_BTK = jnp.repeat(tokens_BT[..., None], 3, axis=-1)
    weights_BTK = jax.nn.softmax(jax.random.normal(jax.random.key(2), same_BTK.shape), axis=-1)
    superposed_BTV, _ = model.apply({"params": params}, same_BTK, token_weights_BTK=weights_BTK)
    np.testing.assert_allclose(superposed_BTV, plain_BTV, atol=1e-5)
    # Different tokens: the input is sum_k w_k E[token_k], so one-hot weights pick a single token.
    mixed_BTK = jnp.stack([tokens_BT, (tokens_BT + 1) % 97], axis=-1)
    picked_BTV, _ = model.apply({"params": params}, mixed_BTK, token_weights_BTK=jnp.eye(2)[jnp.zeros_like(tokens_BT)])
    np.testing.assert_allclose(picked_BTV, plain_BTV, atol=1e-5)
