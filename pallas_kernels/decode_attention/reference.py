"""Plain-jnp decode attention over a length-masked KV cache: the ground truth the Pallas kernel is tested against."""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("scale",))
def decode_attention_reference(q_BNH, k_BKSH, v_BKSH, lengths_B, *, scale):
    """One decode step of softmax attention: q [B, N, H] attends to cached positions [0, lengths_B[b]).

    N = K * group; query head n reads kv head n // group. Scores and softmax are fp32; a sequence with
    length 0 gets zeros. Cache entries at or past a sequence's length never reach the output, even if NaN.
    """
    batch, num_heads, head_dim = q_BNH.shape
    kv_heads, cache_len = k_BKSH.shape[1], k_BKSH.shape[2]
    q_BKGH = q_BNH.reshape(batch, kv_heads, num_heads // kv_heads, head_dim).astype(jnp.float32)
    valid_BS = jnp.arange(cache_len)[None, :] < lengths_B[:, None]
    s_BKGS = jnp.einsum(
        "bkgh,bksh->bkgs", q_BKGH, k_BKSH.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    ) * scale
    s_BKGS = jnp.where(valid_BS[:, None, None, :], s_BKGS, -jnp.inf)
    m_BKG1 = jnp.max(s_BKGS, axis=-1, keepdims=True)
    # A length-0 row has max -inf; shift by 0 instead so exp gives zeros rather than NaN.
    p_BKGS = jnp.exp(s_BKGS - jnp.where(jnp.isfinite(m_BKG1), m_BKG1, 0.0))
    l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
    # Zero masked values too: 0 * NaN would otherwise leak garbage past the length into the sum.
    v_BKSH = jnp.where(valid_BS[:, None, :, None], v_BKSH.astype(jnp.float32), 0.0)
    o_BKGH = jnp.einsum("bkgs,bksh->bkgh", p_BKGS, v_BKSH, precision=jax.lax.Precision.HIGHEST)
    o_BKGH = o_BKGH / jnp.where(l_BKG1 == 0.0, 1.0, l_BKG1)
    return o_BKGH.reshape(batch, num_heads, head_dim).astype(q_BNH.dtype)
