"""Plain-jnp decode attention over a MatryoshkaKV compressed cache: the ground truth the Pallas kernel is tested
against."""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("scale",))
def low_rank_decode_attention_reference(q_BNH, k_BKSR, v_BKSR, lengths_B, key_basis_KHR, value_basis_KHR,
                                        key_ranks_K, value_ranks_K, *, scale):
    """One decode step: the query q U_k (columns past the head's key rank zeroed) attends to compressed cached
    positions [0, lengths_B[b]); the output, columns past the value rank zeroed, comes back as o U_v^T [B, N, H].

    N = K * group; query head n reads kv head n // group. fp32 throughout; a sequence with length 0 gets zeros.
    With both bases None, q [B, N, R] is in the key basis already and the output [B, N, R] stays in the value's."""
    batch, num_heads, head_dim = q_BNH.shape
    kv_heads, cache_len, rank = k_BKSR.shape[1:]
    hi = jax.lax.Precision.HIGHEST
    q_BKGH = q_BNH.reshape(batch, kv_heads, num_heads // kv_heads, head_dim).astype(jnp.float32)
    columns_R = jnp.arange(rank)
    q_BKGR = q_BKGH if key_basis_KHR is None else jnp.einsum("bkgh,khr->bkgr", q_BKGH,
                                                             key_basis_KHR.astype(jnp.float32), precision=hi)
    q_BKGR = jnp.where((columns_R[None, :] < key_ranks_K[:, None])[None, :, None], q_BKGR, 0.0)
    valid_BS = jnp.arange(cache_len)[None, :] < lengths_B[:, None]
    s_BKGS = jnp.einsum("bkgr,bksr->bkgs", q_BKGR, k_BKSR.astype(jnp.float32), precision=hi) * scale
    s_BKGS = jnp.where(valid_BS[:, None, None, :], s_BKGS, -jnp.inf)
    m_BKG1 = jnp.max(s_BKGS, axis=-1, keepdims=True)
    p_BKGS = jnp.exp(s_BKGS - jnp.where(jnp.isfinite(m_BKG1), m_BKG1, 0.0))
    l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
    v_BKSR = jnp.where(valid_BS[:, None, :, None], v_BKSR.astype(jnp.float32), 0.0)
    o_BKGR = jnp.einsum("bkgs,bksr->bkgr", p_BKGS, v_BKSR, precision=hi) / jnp.where(l_BKG1 == 0.0, 1.0, l_BKG1)
    o_BKGR = jnp.where((columns_R[None, :] < value_ranks_K[:, None])[None, :, None], o_BKGR, 0.0)
    if value_basis_KHR is None:
        return o_BKGR.reshape(batch, num_heads, rank).astype(q_BNH.dtype)
    o_BKGH = jnp.einsum("bkgr,khr->bkgh", o_BKGR, value_basis_KHR.astype(jnp.float32), precision=hi)
    return o_BKGH.reshape(batch, num_heads, head_dim).astype(q_BNH.dtype)
