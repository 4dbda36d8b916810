"""Plain-jnp references for causal linear attention with per-head exponential decay.

Semantics (Lightning Attention-2, no 1/sqrt(d) scale, no normaliser), per head h with rate lambda_h:
    S_t = lambda_h * S_{t-1} + k_t^T v_t,    o_t = q_t S_t,    S_{-1} = initial state.
Both forms accumulate in float32 and return the output in the input dtype and the final state in float32.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def quadratic(q_BTHD, k_BTHD, v_BTHE, decay_H, initial_state_BHDE):
    """O(T^2) form: ((q k^T) * M) v with the masked decay matrix M_ts = lambda^(t-s) for s <= t."""
    T = q_BTHD.shape[1]
    q, k, v = (x.astype(jnp.float32) for x in (q_BTHD, k_BTHD, v_BTHE))
    log_decay_H = jnp.log(decay_H.astype(jnp.float32))
    t_T = jnp.arange(T, dtype=jnp.float32)
    diff_TT = t_T[:, None] - t_T[None, :]
    causal_TT = diff_TT >= 0
    # Clamp the exponent above the diagonal so lambda^(negative) cannot overflow before the mask zeroes it.
    exponent_HTT = jnp.where(causal_TT, diff_TT, 0.0)[None] * log_decay_H[:, None, None]
    mask_HTT = jnp.where(causal_TT[None], jnp.exp(exponent_HTT), 0.0)
    scores_BHTT = jnp.einsum("bthd,bshd->bhts", q, k, precision=_HIGHEST) * mask_HTT[None]
    o_BTHE = jnp.einsum("bhts,bshe->bthe", scores_BHTT, v, precision=_HIGHEST)
    # Token t sees the initial state decayed t+1 times.
    q_decay_TH = jnp.exp((t_T[:, None] + 1.0) * log_decay_H[None, :])
    o_BTHE += jnp.einsum("bthd,bhde->bthe", q * q_decay_TH[None, :, :, None], initial_state_BHDE, precision=_HIGHEST)
    k_decay_TH = jnp.exp((T - 1.0 - t_T[:, None]) * log_decay_H[None, :])
    final_BHDE = jnp.exp(T * log_decay_H)[None, :, None, None] * initial_state_BHDE + jnp.einsum(
        "bthd,bthe->bhde", k * k_decay_TH[None, :, :, None], v, precision=_HIGHEST
    )
    return o_BTHE.astype(q_BTHD.dtype), final_BHDE


def decode_step(q_BHD, k_BHD, v_BHE, decay_H, state_BHDE):
    """One token: S' = lambda S + k^T v, o = q S'. Returns (o_BHE in the input dtype, S' in float32)."""
    q, k, v = (x.astype(jnp.float32) for x in (q_BHD, k_BHD, v_BHE))
    state_BHDE = decay_H.astype(jnp.float32)[None, :, None, None] * state_BHDE + k[..., :, None] * v[..., None, :]
    o_BHE = jnp.einsum("bhd,bhde->bhe", q, state_BHDE, precision=_HIGHEST)
    return o_BHE.astype(q_BHD.dtype), state_BHDE


def recurrent(q_BTHD, k_BTHD, v_BTHE, decay_H, initial_state_BHDE):
    """O(T) token-by-token scan of the state recurrence (the decode step applied T times)."""

    def step(state_BHDE, qkv):
        o_BHE, state_BHDE = decode_step(*qkv, decay_H, state_BHDE)
        return state_BHDE, o_BHE

    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q_BTHD, k_BTHD, v_BTHE))
    final_BHDE, o_TBHE = jax.lax.scan(step, initial_state_BHDE.astype(jnp.float32), xs)
    return jnp.moveaxis(o_TBHE, 0, 1).astype(q_BTHD.dtype), final_BHDE
