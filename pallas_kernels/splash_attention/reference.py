"""Plain-jnp causal softmax attention with grouped kv heads: the ground truth the splash wrapper is tested against."""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def causal_attention_reference(q_BTNH, k_BTKH, v_BTKH, *, scale):
    """o [B, T, N, H]: query t attends to keys 0..t, query head n to kv head n // (N / K); float32 softmax."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H).astype(jnp.float32)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BTKH.astype(jnp.float32), precision=_HIGHEST) * scale
    causal_TS = jnp.tril(jnp.ones((T, T), bool))
    probs_BKGTS = jax.nn.softmax(jnp.where(causal_TS, logits_BKGTS, -jnp.inf), axis=-1)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BTKH.astype(jnp.float32), precision=_HIGHEST)
    return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
