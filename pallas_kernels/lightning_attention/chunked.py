"""Chunked jnp form: parallel masked-decay products inside blocks, a scan of decayed states across blocks.

This is Lightning Attention-2's split written for XLA instead of a kernel: all intra-block work and all
per-block key-value sums are batched einsums, and only the D x E state recurrence over blocks is sequential.
It is the fallback on every backend and the fast CPU path; autodiff gives its gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np

import shapes


def chunked(q_BTHD, k_BTHD, v_BTHE, decay_H, initial_state_BHDE, *, block_size):
    """Returns (o_BTHE in the input dtype, final_state_BHDE in float32); T need not divide block_size."""
    B, T, H, D = q_BTHD.shape
    E = v_BTHE.shape[-1]
    C = block_size
    N = shapes.round_up(T, C) // C
    pad = N * C - T
    # Zero padding at the end adds nothing to the state; the last block's decays below use its true length.
    q, k, v = (jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTHD, k_BTHD, v_BTHE))
    q_BNCHD = q.reshape(B, N, C, H, D)
    k_BNCHD = k.reshape(B, N, C, H, D)
    v_BNCHE = v.reshape(B, N, C, H, E)

    log_decay_H = jnp.log(decay_H.astype(jnp.float32))
    a_C = np.arange(C, dtype=np.float32)
    length_N = np.minimum(C, T - C * np.arange(N)).astype(np.float32)
    diff_CC = a_C[:, None] - a_C[None, :]
    mask_HCC = jnp.where(diff_CC[None] >= 0, jnp.exp(np.maximum(diff_CC, 0.0)[None] * log_decay_H[:, None, None]), 0.0)
    q_decay_CH = jnp.exp((a_C[:, None] + 1.0) * log_decay_H[None])
    # Key b of block n reaches the block's outgoing state decayed (length_n - 1 - b) times; padded keys not at all.
    k_exp_NC = length_N[:, None] - 1.0 - a_C[None, :]
    k_decay_NCH = jnp.where(k_exp_NC[..., None] >= 0,
                            jnp.exp(np.maximum(k_exp_NC, 0.0)[..., None] * log_decay_H[None, None]), 0.0)
    block_decay_NH = jnp.exp(length_N[:, None] * log_decay_H[None])

    scores_BNHCC = jnp.einsum("bnchd,bnshd->bnhcs", q_BNCHD, k_BNCHD) * mask_HCC[None, None]
    o_BNCHE = jnp.einsum("bnhcs,bnshe->bnche", scores_BNHCC, v_BNCHE)
    kv_NBHDE = jnp.einsum("bnchd,nch,bnche->nbhde", k_BNCHD, k_decay_NCH, v_BNCHE)

    def carry_state(state_BHDE, inputs):
        kv_BHDE, block_decay_H = inputs
        return block_decay_H[None, :, None, None] * state_BHDE + kv_BHDE, state_BHDE

    final_BHDE, incoming_NBHDE = jax.lax.scan(
        carry_state, initial_state_BHDE.astype(jnp.float32), (kv_NBHDE, block_decay_NH)
    )
    o_BNCHE += jnp.einsum("bnchd,ch,nbhde->bnche", q_BNCHD, q_decay_CH, incoming_NBHDE)
    o_BTHE = o_BNCHE.reshape(B, N * C, H, E)[:, :T]
    return o_BTHE.astype(q_BTHD.dtype), final_BHDE
