"""Splash attention (JAX's TPU kernel) in interpret mode against the plain-jnp causal reference: outputs and
gradients, grouped kv heads, both dtypes; and its input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import InputError
from pallas_kernels.splash_attention import causal_attention_reference, splash_attention

# Relative to the largest reference value. float32: interpret mode is exact float32, only the blockwise softmax's
# summation order differs (measured <= 1.4e-6). bf16: q is scaled in bf16, probabilities enter the PV matmul in
# bf16 and outputs round to bf16 (measured <= 3.7e-3).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _inputs(B, T, N, K, H, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32).astype(dtype)
    return q, k, v


def _value_and_grads(attend, q, k, v):
    """o and (dq, dk, dv) for a fixed random cotangent, in one jitted call."""
    do = jax.random.normal(jax.random.key(1), q.shape, jnp.float32).astype(q.dtype)

    def loss(q, k, v):
        o = attend(q, k, v)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, grads


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_splash_matches_reference_forward_and_backward(dtype):
    # 4 query heads over 2 kv heads; 256 positions in two 128 blocks: a diagonal, an empty and a full block.
    q, k, v = _inputs(2, 256, 4, 2, 64, dtype)
    o, grads = _value_and_grads(lambda q, k, v: splash_attention(q, k, v, block_size=128), q, k, v)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    o_ref, grads_ref = _value_and_grads(
        lambda q, k, v: causal_attention_reference(q, k, v, scale=64**-0.5), f32(q), f32(k), f32(v)
    )
    assert o.dtype == dtype and o.shape == q.shape
    for name, actual, expected in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_ref, *grads_ref)):
        assert _relative_error(actual, expected) <= TOL[dtype], name


def test_reference_is_causal_softmax():
    q, k, v = _inputs(1, 5, 2, 1, 3, jnp.float32)
    o = np.asarray(causal_attention_reference(q, k, v, scale=0.5), np.float64)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for t in range(5):
        for n in range(2):
            s = kn[0, : t + 1, 0] @ qn[0, t, n] * 0.5
            p = np.exp(s - s.max())
            np.testing.assert_allclose(o[0, t, n], p @ vn[0, : t + 1, 0] / p.sum(), atol=1e-6)


def test_default_block_divides_the_length():
    # 384 positions: 512 and 256 do not divide it, 128 does; the answer equals the reference's.
    q, k, v = _inputs(1, 384, 2, 1, 32, jnp.float32)
    o = jax.jit(splash_attention)(q, k, v)
    np.testing.assert_allclose(o, causal_attention_reference(q, k, v, scale=32**-0.5), atol=1e-5, rtol=1e-5)


def _bad(**overrides):
    q, k, v = (jnp.zeros(s) for s in ((1, 256, 4, 16), (1, 256, 2, 16), (1, 256, 2, 16)))
    return dict(dict(q_BTNH=q, k_BTKH=k, v_BTKH=v), **overrides)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (_bad(q_BTNH=jnp.zeros((256, 4, 16))), {}, r"q_BTNH must be .* \(256, 4, 16\)"),
        (_bad(v_BTKH=jnp.zeros((1, 256, 2, 8))), {}, r"k_BTKH \(1, 256, 2, 16\) and v_BTKH \(1, 256, 2, 8\)"),
        (_bad(k_BTKH=jnp.zeros((1, 128, 2, 16)), v_BTKH=jnp.zeros((1, 128, 2, 16))), {}, r"on batch, length"),
        (_bad(k_BTKH=jnp.zeros((1, 256, 3, 16)), v_BTKH=jnp.zeros((1, 256, 3, 16))), {}, r"heads=4 .*kv_heads=3"),
        (_bad(q_BTNH=jnp.zeros((1, 256, 4, 16), jnp.bfloat16)), {}, r"dtypes bfloat16, float32, float32"),
        (_bad(), {"block_size": 96}, r"block_size=96; expected a multiple of 128 dividing the length 256"),
        (_bad(), {"block_size": 512}, r"block_size=512"),
        (_bad(**{n: jnp.zeros((1, 200, h, 16)) for n, h in (("q_BTNH", 4), ("k_BTKH", 2), ("v_BTKH", 2))}), {},
         r"length 200 .* multiple of 128"),
        (_bad(), {"implementation": "flash"}, r"implementation='flash'"),
        (_bad(), {"interpret": False}, r"interpret=False needs a GPU or TPU"),
    ],
)
def test_bad_inputs_raise_one_line_input_error(args, kwargs, match):
    with pytest.raises(InputError, match=match) as info:
        splash_attention(**args, **kwargs)
    assert "\n" not in str(info.value)
