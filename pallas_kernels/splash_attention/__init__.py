"""Causal softmax attention for training on TPU: JAX's splash attention kernel, or the plain-jnp reference.

On GPU the cuDNN path (jax.nn.dot_product_attention(implementation="cudnn")) plays this part; this kernel is
TPU-only (Mosaic), and runs on CPU in interpret mode.
"""

import functools
import math

import jax.numpy as jnp

from errors import InputError
from errors.checks import is_int
from pallas_kernels.backend import kernel_backend
from pallas_kernels.sharding import KernelSharding
from pallas_kernels.splash_attention.kernel import splash_attention_pallas
from pallas_kernels.splash_attention.reference import causal_attention_reference

IMPLEMENTATIONS = ("reference", "pallas")
# Splash computes scores in blocks of 128 lanes; MaxText's default block is 512.
_LANES = 128
_DEFAULT_BLOCK = 512


def _validate(q_BTNH, k_BTKH, v_BTKH, implementation, block_size):
    if implementation not in IMPLEMENTATIONS:
        raise InputError(f"splash_attention: implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
    if q_BTNH.ndim != 4:
        raise InputError(f"splash_attention: q_BTNH must be [batch, length, heads, head_dim], got {q_BTNH.shape}")
    if k_BTKH.ndim != 4 or v_BTKH.shape != k_BTKH.shape:
        raise InputError(
            f"splash_attention: k_BTKH {k_BTKH.shape} and v_BTKH {v_BTKH.shape} must both be "
            "[batch, length, kv_heads, head_dim]"
        )
    B, T, N, H = q_BTNH.shape
    if (k_BTKH.shape[0], k_BTKH.shape[1], k_BTKH.shape[3]) != (B, T, H):
        raise InputError(
            f"splash_attention: k_BTKH shape {k_BTKH.shape} disagrees with q_BTNH shape {q_BTNH.shape} on batch, "
            "length or head_dim"
        )
    K = k_BTKH.shape[2]
    if K == 0 or N % K:
        raise InputError(f"splash_attention: heads={N} (q_BTNH {q_BTNH.shape}) is not a multiple of kv_heads={K}")
    if q_BTNH.dtype not in (jnp.float32, jnp.bfloat16) or k_BTKH.dtype != q_BTNH.dtype or v_BTKH.dtype != q_BTNH.dtype:
        raise InputError(
            f"splash_attention: q, k, v dtypes {q_BTNH.dtype}, {k_BTKH.dtype}, {v_BTKH.dtype}; expected all "
            "float32 or all bfloat16"
        )
    if implementation == "pallas" and block_size is not None:
        if not is_int(block_size) or block_size <= 0 or block_size % _LANES or T % block_size:
            raise InputError(
                f"splash_attention: block_size={block_size!r}; expected a multiple of {_LANES} dividing the "
                f"length {T}"
            )


def _default_block(seq_len):
    """The largest of 512, 256, 128 dividing the length."""
    for block in (_DEFAULT_BLOCK, 2 * _LANES, _LANES):
        if seq_len % block == 0:
            return block
    raise InputError(f"splash_attention: length {seq_len} (q_BTNH dim 1) must be a multiple of {_LANES}")


def splash_attention(
    q_BTNH, k_BTKH, v_BTKH, *, scale=None, implementation="pallas", block_size=None, interpret=None,
    sharding: KernelSharding | None = None,
):
    """Causal attention of a sequence over itself: q [B, T, N, H], k/v [B, T, K, H] -> o [B, T, N, H].

    N = K * group (query head n reads kv head n // group); scale=None means 1/sqrt(H); float32 softmax; the
    output has q's dtype; differentiable in q, k and v. implementation: "pallas" (splash attention, TPU or CPU
    interpret mode) or "reference" (plain jnp). block_size: query and key positions per kernel block, a
    multiple of 128 dividing T (None: 512, 256 or 128). interpret=None interprets on CPU. sharding: mesh axes
    the batch and head dims are split over; the call then runs per shard under shard_map.
    """
    _validate(q_BTNH, k_BTKH, v_BTKH, implementation, block_size)
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1]) if scale is None else float(scale)
    if implementation == "reference":
        attend = functools.partial(causal_attention_reference, scale=scale)
    else:
        backend, interpret = kernel_backend(interpret, caller="splash_attention")
        if backend != "tpu" and not interpret:
            raise InputError(
                "splash_attention: implementation='pallas' compiles for TPU only; on GPU use the cuDNN path "
                "(jax.nn.dot_product_attention(implementation='cudnn')) or interpret=True"
            )
        block = _default_block(q_BTNH.shape[1]) if block_size is None else block_size
        attend = functools.partial(splash_attention_pallas, scale=scale, block_size=block, interpret=interpret)

    if sharding is None:
        return attend(q_BTNH, k_BTKH, v_BTKH)
    inputs = dict(q_BTNH=(q_BTNH, "b.h."), k_BTKH=(k_BTKH, "b.h."), v_BTKH=(v_BTKH, "b.h."))
    return sharding.run(attend, inputs, "b.h.", caller="splash_attention")


__all__ = ["IMPLEMENTATIONS", "causal_attention_reference", "splash_attention", "splash_attention_pallas"]
