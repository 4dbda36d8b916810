"""Decode attention over a KV cache with ragged lengths: validation and dispatch to the Pallas kernel or reference."""

import math

import jax

from errors import InputError
from pallas_kernels.decode_attention.kernel import decode_attention_pallas
from pallas_kernels.decode_attention.reference import decode_attention_reference

IMPLEMENTATIONS = ("reference", "pallas")


def _validate(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation, block_size, num_splits):
    if implementation not in IMPLEMENTATIONS:
        raise InputError(f"decode_attention: implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
    if q_BNH.ndim != 3:
        raise InputError(f"decode_attention: q_BNH must be [batch, num_heads, head_dim], got shape {q_BNH.shape}")
    if k_BKSH.ndim != 4:
        raise InputError(
            f"decode_attention: k_BKSH must be [batch, kv_heads, cache_len, head_dim], got shape {k_BKSH.shape}"
        )
    if v_BKSH.shape != k_BKSH.shape:
        raise InputError(f"decode_attention: v_BKSH shape {v_BKSH.shape} != k_BKSH shape {k_BKSH.shape}")
    if k_BKSH.shape[2] == 0:
        raise InputError(f"decode_attention: k_BKSH shape {k_BKSH.shape} has cache_len 0; expected at least 1")
    batch, num_heads, head_dim = q_BNH.shape
    if k_BKSH.shape[0] != batch or k_BKSH.shape[3] != head_dim:
        raise InputError(
            f"decode_attention: q_BNH shape {q_BNH.shape} and k_BKSH shape {k_BKSH.shape} disagree on batch or head_dim"
        )
    kv_heads = k_BKSH.shape[1]
    if kv_heads == 0 or num_heads % kv_heads:
        raise InputError(
            f"decode_attention: num_heads={num_heads} (q_BNH {q_BNH.shape}) is not a multiple of "
            f"kv_heads={kv_heads} (k_BKSH {k_BKSH.shape})"
        )
    if lengths_B.shape != (batch,):
        raise InputError(f"decode_attention: lengths_B shape {lengths_B.shape} != (batch,) = ({batch},)")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 8:
        raise InputError(f"decode_attention: block_size={block_size!r}; expected a positive multiple of 8")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits <= 0):
        raise InputError(f"decode_attention: num_splits={num_splits!r}; expected a positive int or None")


def decode_attention(
    q_BNH, k_BKSH, v_BKSH, lengths_B, *, scale=None, implementation="pallas", block_size=256, num_splits=None,
    interpret=None,
):
    """Attention of one decode step's queries q [B, N, H] over the cache k/v [B, K, S, H] -> o [B, N, H].

    N = K * group (query head n reads kv head n // group); sequence b attends to positions [0, lengths_B[b]) and
    gets zeros if its length is 0. scale=None means 1/sqrt(H). Accumulates in fp32; the output has q's dtype.
    implementation: "pallas" (flash-decoding kernel) or "reference" (plain jnp). block_size: cache positions per
    kernel step; num_splits: splits of the cache per (sequence, kv head), None = chosen by backend.
    interpret=None runs the kernel in interpret mode on CPU and compiled on GPU/TPU.
    """
    _validate(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation, block_size, num_splits)
    scale = 1.0 / math.sqrt(q_BNH.shape[-1]) if scale is None else float(scale)
    if implementation == "reference":
        return decode_attention_reference(q_BNH, k_BKSH, v_BKSH, lengths_B, scale=scale)
    platform = jax.default_backend()
    return decode_attention_pallas(
        q_BNH, k_BKSH, v_BKSH, lengths_B,
        scale=scale,
        block_size=block_size,
        num_splits=num_splits,
        backend="tpu" if platform == "tpu" else "gpu",
        interpret=platform == "cpu" if interpret is None else interpret,
    )


__all__ = ["IMPLEMENTATIONS", "decode_attention", "decode_attention_pallas", "decode_attention_reference"]
