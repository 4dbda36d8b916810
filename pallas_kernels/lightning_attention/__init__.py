"""Lightning Attention-2: causal linear attention with per-head exponential decay, O(T) in length.

    o_t = sum_{s<=t} decay_h^(t-s) (q_t . k_s) v_s,   state S_t = decay_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t.

No 1/sqrt(d) scale and no normaliser (the caller scales q if it wants one). Inputs are [B, T, H, D] (v may have
its own width E); the state is [B, H, D, E] float32; outputs come back in the input dtype, sums in float32.
Implementations: "reference" (quadratic masked-decay matrix), "recurrent" (token scan), "chunked" (jnp blocks,
the fallback and the fast CPU path) and "pallas" (kernels in kernel.py; interpret mode on CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from errors import InputError
from pallas_kernels.backend import kernel_backend
from pallas_kernels.lightning_attention import chunked, kernel, reference
from pallas_kernels.sharding import KernelSharding

IMPLEMENTATIONS = ("reference", "recurrent", "chunked", "pallas")
DECODE_IMPLEMENTATIONS = ("jnp", "pallas")
_DTYPES = (jnp.float32, jnp.bfloat16)


def _check_decay(decay_H, num_heads):
    if np.shape(decay_H) != (num_heads,):
        raise InputError(f"decay_H must have shape ({num_heads},) (one rate per head), got {np.shape(decay_H)}")
    # Values can only be checked when known; inside a jit with a traced decay the caller owns the range.
    if isinstance(decay_H, jax.core.Tracer):
        return
    decay = np.asarray(decay_H, dtype=np.float64)
    if not np.all((decay > 0) & (decay <= 1)):
        raise InputError(f"decay_H must lie in (0, 1] for every head, got {decay.tolist()}")


def _check_block_size(block_size, implementation, interpret):
    """For "pallas", returns (kernel backend, interpret) once block_size is known to suit them; else None."""
    if implementation not in ("chunked", "pallas"):
        return None
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
        raise InputError(f"block_size must be a positive int, got {block_size!r}")
    if implementation == "chunked":
        return None
    backend, interpret = kernel_backend(interpret, caller="lightning_attention")
    if block_size % 8:
        raise InputError(f"block_size={block_size} must be a multiple of 8 for the pallas kernel (TPU sublane tiling)")
    if backend == "gpu" and not interpret and (block_size < 16 or block_size & (block_size - 1)):
        raise InputError(f"block_size={block_size} must be a power of two >= 16 for the pallas kernel on GPU (Triton)")
    return backend, interpret


def _check_qkv(q, k, v, names):
    """Checks shared by a sequence's and one token's q, k, v (q's rank already checked); `names` for messages."""
    q_name, k_name, v_name = names
    if tuple(k.shape) != tuple(q.shape):
        raise InputError(f"{k_name} shape {tuple(k.shape)} must equal {q_name} shape {tuple(q.shape)}")
    leading = ", ".join(str(n) for n in q.shape[:-1])
    if v.ndim != q.ndim or tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise InputError(f"{v_name} must be [{leading}, E] to match {q_name}, got {tuple(v.shape)}")
    if q.dtype not in _DTYPES:
        raise InputError(f"{q_name} dtype must be float32 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_inputs(q_BTHD, k_BTHD, v_BTHE, decay_H, initial_state_BHDE):
    if q_BTHD.ndim != 4:
        raise InputError(f"q_BTHD must be [batch, length, heads, dim], got shape {tuple(q_BTHD.shape)}")
    B, T, H, D = q_BTHD.shape
    if T < 1:
        raise InputError(f"q_BTHD must hold at least one token, got shape {tuple(q_BTHD.shape)}")
    _check_qkv(q_BTHD, k_BTHD, v_BTHE, ("q_BTHD", "k_BTHD", "v_BTHE"))
    _check_decay(decay_H, H)
    state_shape = (B, H, D, v_BTHE.shape[3])
    if initial_state_BHDE is not None and tuple(initial_state_BHDE.shape) != state_shape:
        raise InputError(f"initial_state_BHDE must have shape {state_shape}, got {tuple(initial_state_BHDE.shape)}")
    return state_shape


def lightning_attention(
    q_BTHD, k_BTHD, v_BTHE, decay_H, *, initial_state_BHDE=None, implementation="chunked", block_size=64,
    interpret=None, sharding: KernelSharding | None = None,
):
    """Causal decayed linear attention over a sequence; returns (o_BTHE, final_state_BHDE).

    decay_H: rates in (0, 1], float32 [H]. initial_state_BHDE continues from an earlier prefix (zeros if None);
    the final state feeds `lightning_decode_step`. block_size: tokens per block ("chunked", "pallas"); T need
    not be a multiple. interpret (pallas only): None = interpret on CPU, compile on GPU/TPU. sharding: mesh axes
    the batch and head dims are split over; the call then runs per shard under shard_map. Differentiable in
    q, k, v and the initial state for every implementation; "pallas" gives decay_H a zero gradient.
    """
    if implementation not in IMPLEMENTATIONS:
        raise InputError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    state_shape = _check_inputs(q_BTHD, k_BTHD, v_BTHE, decay_H, initial_state_BHDE)
    backend_and_interpret = _check_block_size(block_size, implementation, interpret)
    decay_H = jnp.asarray(decay_H, jnp.float32)
    if initial_state_BHDE is None:
        initial_state_BHDE = jnp.zeros(state_shape, jnp.float32)
    if implementation == "reference":
        attend = reference.quadratic
    elif implementation == "recurrent":
        attend = reference.recurrent
    elif implementation == "chunked":
        attend = functools.partial(chunked.chunked, block_size=int(block_size))
    else:
        backend, interpret = backend_and_interpret
        attend = functools.partial(
            kernel.pallas_attention, block_size=int(block_size), backend=backend, interpret=interpret
        )
    if sharding is None:
        return attend(q_BTHD, k_BTHD, v_BTHE, decay_H, initial_state_BHDE)
    inputs = dict(q_BTHD=(q_BTHD, "b.h."), k_BTHD=(k_BTHD, "b.h."), v_BTHE=(v_BTHE, "b.h."), decay_H=(decay_H, "h"),
                  initial_state_BHDE=(initial_state_BHDE, "bh.."))
    return sharding.run(attend, inputs, ("b.h.", "bh.."), caller="lightning_attention")


def lightning_decode_step(
    q_BHD, k_BHD, v_BHE, decay_H, state_BHDE, *, implementation="jnp", interpret=None,
    sharding: KernelSharding | None = None,
):
    """One generated token: returns (o_BHE in the input dtype, new_state_BHDE float32).

    "jnp" is a fused elementwise update XLA handles well; "pallas" is the same step as a kernel (grid B x H).
    sharding as in `lightning_attention`.
    """
    if implementation not in DECODE_IMPLEMENTATIONS:
        raise InputError(f"implementation must be one of {DECODE_IMPLEMENTATIONS}, got {implementation!r}")
    if q_BHD.ndim != 3:
        raise InputError(f"q_BHD must be [batch, heads, dim], got shape {tuple(q_BHD.shape)}")
    B, H, D = q_BHD.shape
    _check_qkv(q_BHD, k_BHD, v_BHE, ("q_BHD", "k_BHD", "v_BHE"))
    _check_decay(decay_H, H)
    if tuple(state_BHDE.shape) != (B, H, D, v_BHE.shape[2]):
        raise InputError(f"state_BHDE must have shape {(B, H, D, v_BHE.shape[2])}, got {tuple(state_BHDE.shape)}")
    decay_H = jnp.asarray(decay_H, jnp.float32)
    if implementation == "jnp":
        step = reference.decode_step
    else:
        backend, interpret = kernel_backend(interpret, caller="lightning_decode_step")
        step = functools.partial(kernel.pallas_decode_step, backend=backend, interpret=interpret)
    if sharding is None:
        return step(q_BHD, k_BHD, v_BHE, decay_H, state_BHDE)
    inputs = dict(q_BHD=(q_BHD, "bh."), k_BHD=(k_BHD, "bh."), v_BHE=(v_BHE, "bh."), decay_H=(decay_H, "h"),
                  state_BHDE=(state_BHDE, "bh.."))
    return sharding.run(step, inputs, ("bh.", "bh.."), caller="lightning_decode_step")
