"""Decode attention over a MatryoshkaKV compressed cache (models/low_rank_kv_cache.py): validation and dispatch to
the Pallas kernel or the reference."""

import functools
import math

from errors import InputError
from pallas_kernels.backend import kernel_backend
from pallas_kernels.decode_attention.block_sizes import BlockSizes
from pallas_kernels.low_rank_decode_attention.kernel import low_rank_decode_attention_pallas
from pallas_kernels.low_rank_decode_attention.reference import low_rank_decode_attention_reference
from pallas_kernels.sharding import KernelSharding

IMPLEMENTATIONS = ("reference", "pallas")
_CALLER = "low_rank_decode_attention"


def _validate(q_BNH, k_BKSR, v_BKSR, lengths_B, key_basis_KHR, value_basis_KHR, key_ranks_K, value_ranks_K,
              implementation):
    if implementation not in IMPLEMENTATIONS:
        raise InputError(f"{_CALLER}: implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
    if q_BNH.ndim != 3 or k_BKSR.ndim != 4:
        raise InputError(f"{_CALLER}: q_BNH must be [batch, num_heads, head_dim] and k_BKSR [batch, kv_heads, "
                         f"cache_len, rank], got shapes {q_BNH.shape} and {k_BKSR.shape}")
    if v_BKSR.shape != k_BKSR.shape:
        raise InputError(f"{_CALLER}: v_BKSR shape {v_BKSR.shape} != k_BKSR shape {k_BKSR.shape}")
    batch, num_heads, head_dim = q_BNH.shape
    _, kv_heads, cache_len, rank = k_BKSR.shape
    if cache_len == 0:
        raise InputError(f"{_CALLER}: k_BKSR shape {k_BKSR.shape} has cache_len 0; expected at least 1")
    if k_BKSR.shape[0] != batch or kv_heads == 0 or num_heads % kv_heads:
        raise InputError(f"{_CALLER}: q_BNH shape {q_BNH.shape} and k_BKSR shape {k_BKSR.shape} disagree: the "
                         "same batch, and num_heads a multiple of kv_heads")
    if (key_basis_KHR is None) != (value_basis_KHR is None):
        raise InputError(f"{_CALLER}: key_basis_KHR and value_basis_KHR must both be given (q in head_dim "
                         "coordinates) or both be None (q already in the key basis)")
    if key_basis_KHR is None and head_dim != rank:
        raise InputError(f"{_CALLER}: without bases q_BNH {q_BNH.shape} must have the cache's rank={rank} columns "
                         f"(k_BKSR {k_BKSR.shape})")
    if not 1 <= rank <= head_dim:
        raise InputError(f"{_CALLER}: k_BKSR holds rank={rank} columns per head; expected 1 to head_dim={head_dim} "
                         f"(q_BNH {q_BNH.shape})")
    for name, basis in (("key_basis_KHR", key_basis_KHR), ("value_basis_KHR", value_basis_KHR)):
        if basis is not None and basis.shape != (kv_heads, head_dim, rank):
            raise InputError(f"{_CALLER}: {name} shape {basis.shape} != (kv_heads, head_dim, rank) = "
                             f"{(kv_heads, head_dim, rank)}")
    for name, ranks in (("key_ranks_K", key_ranks_K), ("value_ranks_K", value_ranks_K)):
        if ranks.shape != (kv_heads,):
            raise InputError(f"{_CALLER}: {name} shape {ranks.shape} != (kv_heads,) = ({kv_heads},)")
    if lengths_B.shape != (batch,):
        raise InputError(f"{_CALLER}: lengths_B shape {lengths_B.shape} != (batch,) = ({batch},)")


def check_rank(rank: int, backend: str, compiled: bool, key: str = "rank") -> None:
    """The compressed width the compiled kernel takes without copying the cache: on GPU (Triton) a power of two
    >= 16, every tensor being padded to one; TPU (Mosaic) and interpret mode take any width."""
    if backend == "gpu" and compiled and (rank < 16 or rank & (rank - 1)):
        raise InputError(f"{_CALLER}: {key}={rank}; the GPU (Triton) kernel needs a power of two >= 16, or the cache "
                         "would be padded (copied) on every call")


def low_rank_decode_attention(
    q_BNH, k_BKSR, v_BKSR, lengths_B, key_basis_KHR, value_basis_KHR, key_ranks_K, value_ranks_K, *, scale=None,
    implementation="pallas", block_size=None, num_splits=None, interpret=None, num_warps=None, num_stages=None,
    sharding: KernelSharding | None = None,
):
    """One decode step's queries q [B, N, H] (post-RoPE, head_dim H) over a compressed cache k/v [B, K, S, R]
    -> o [B, N, H]: softmax((q U_k) k^T * scale) v U_v^T, with U = key_basis_KHR / value_basis_KHR [K, H, R] (the
    first R columns of each KV head's orthogonal basis) and, per KV head, the query columns past key_ranks_K and
    the output columns past value_ranks_K zeroed. The value mean is not added (the caller's, like U_v^T, could be
    folded into the output projection). With both bases None, q [B, N, R] is already in the key basis and the
    output [B, N, R] stays in the value basis (the model's own path: MatryoshkaKV projects around attention).

    Sequence b attends to positions [0, lengths_B[b]) and gets zeros if its length is 0. scale=None means
    1/sqrt(H), the uncompressed layer's. The tiling arguments, interpret and sharding are decode_attention's."""
    _validate(q_BNH, k_BKSR, v_BKSR, lengths_B, key_basis_KHR, value_basis_KHR, key_ranks_K, value_ranks_K,
              implementation)
    scale = 1.0 / math.sqrt(q_BNH.shape[-1]) if scale is None else float(scale)
    if implementation == "reference":
        attend = functools.partial(low_rank_decode_attention_reference, scale=scale)
    else:
        backend, interpret = kernel_backend(interpret, caller=_CALLER)
        check_rank(k_BKSR.shape[3], backend, compiled=not interpret)
        requested = BlockSizes(block_size, num_splits, num_warps, num_stages)

        def attend(q, k, v, lengths, uk, uv, key_ranks, value_ranks):  # uk, uv: None for q in the key basis
            blocks = requested.resolve(
                backend, compiled=not interpret, programs=q.shape[0] * k.shape[1], cache_len=k.shape[2],
                head_dim=k.shape[3], itemsize=k.dtype.itemsize,
            )
            return low_rank_decode_attention_pallas(q, k, v, lengths, uk, uv, key_ranks, value_ranks, scale=scale,
                                                    blocks=blocks, backend=backend, interpret=interpret)

    args = (q_BNH, k_BKSR, v_BKSR, lengths_B, key_basis_KHR, value_basis_KHR, key_ranks_K, value_ranks_K)
    if sharding is None:
        return attend(*args)
    roles = ("bh.", "bh..", "bh..", "b", "h..", "h..", "h", "h")
    names = ("q_BNH", "k_BKSR", "v_BKSR", "lengths_B", "key_basis_KHR", "value_basis_KHR", "key_ranks_K",
             "value_ranks_K")
    inputs = {name: (array, role) for name, array, role in zip(names, args, roles) if array is not None}
    if key_basis_KHR is None:
        return sharding.run(lambda q, k, v, lengths, key_ranks, value_ranks: attend(
            q, k, v, lengths, None, None, key_ranks, value_ranks), inputs, "bh.", caller=_CALLER)
    return sharding.run(attend, inputs, "bh.", caller=_CALLER)


__all__ = ["IMPLEMENTATIONS", "check_rank", "low_rank_decode_attention", "low_rank_decode_attention_pallas",
           "low_rank_decode_attention_reference"]
