"""Decode attention over a KV cache with ragged lengths: validation and dispatch to the Pallas kernel or reference."""

import functools
import math

from errors import InputError
from pallas_kernels.backend import kernel_backend
from pallas_kernels.decode_attention.block_sizes import BlockSizes
from pallas_kernels.decode_attention.kernel import decode_attention_pallas
from pallas_kernels.decode_attention.reference import decode_attention_reference
from pallas_kernels.sharding import KernelSharding

IMPLEMENTATIONS = ("reference", "pallas")


def _validate(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation):
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


def decode_attention(
    q_BNH, k_BKSH, v_BKSH, lengths_B, *, scale=None, implementation="pallas", block_size=None, num_splits=None,
    interpret=None, num_warps=None, num_stages=None, sharding: KernelSharding | None = None,
):
    """Attention of one decode step's queries q [B, N, H] over the cache k/v [B, K, S, H] -> o [B, N, H].

    N = K * group (query head n reads kv head n // group); sequence b attends to positions [0, lengths_B[b]) and
    gets zeros if its length is 0. scale=None means 1/sqrt(H). Accumulates in fp32; the output has q's dtype.
    implementation: "pallas" (flash-decoding kernel) or "reference" (plain jnp). block_size, num_splits,
    num_warps, num_stages: the kernel's tiling (see block_sizes.BlockSizes), None = the backend's default.
    interpret=None runs the kernel in interpret mode on CPU and compiled on GPU/TPU (see pallas_kernels.backend).
    sharding: mesh axes the batch and head dims are split over; the call then runs per shard under shard_map.
    """
    _validate(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation)
    scale = 1.0 / math.sqrt(q_BNH.shape[-1]) if scale is None else float(scale)
    if implementation == "reference":
        attend = functools.partial(decode_attention_reference, scale=scale)
    else:
        backend, interpret = kernel_backend(interpret, caller="decode_attention")
        requested = BlockSizes(block_size, num_splits, num_warps, num_stages)

        def attend(q, k, v, lengths):
            # Resolved on this call's (per-shard) shapes: the default num_splits fills the chip per device.
            blocks = requested.resolve(
                backend, compiled=not interpret, programs=q.shape[0] * k.shape[1], cache_len=k.shape[2],
                head_dim=k.shape[3], itemsize=k.dtype.itemsize,
            )
            return decode_attention_pallas(q, k, v, lengths, scale=scale, blocks=blocks, backend=backend,
                                           interpret=interpret)

    if sharding is None:
        return attend(q_BNH, k_BKSH, v_BKSH, lengths_B)
    inputs = dict(q_BNH=(q_BNH, "bh."), k_BKSH=(k_BKSH, "bh.."), v_BKSH=(v_BKSH, "bh.."), lengths_B=(lengths_B, "b"))
    return sharding.run(attend, inputs, "bh.", caller="decode_attention")


__all__ = ["IMPLEMENTATIONS", "BlockSizes", "decode_attention", "decode_attention_pallas", "decode_attention_reference"]
