"""Pallas kernels for Lightning Attention-2: forward, backward (custom VJP) over blocks of `block_size` tokens.

The per-block math (`_forward_block`, `_dq_block`, `_dkdv_block`) is written once on values and shared by two
wrappers that differ only in how blocks are walked in order, because grids run differently per backend:
  * "gpu": grid (B, H, E / value_block), one program per (batch, head, value tile) walks all blocks in an
    in-kernel loop carrying its D x value_block float32 state in registers (LA-2's `_fwd_kernel` shape). GPU
    grid programs run in parallel, so the state cannot live across grid steps. Targets the Pallas Triton
    backend (`pltriton.CompilerParams`), because Mosaic GPU's `pallas_call` is deprecated and needs
    warpgroup-level code; Triton needs power-of-two tensors, so D and E are zero-padded to powers of two >= 16.
    This wrapper is also the one CPU interpret mode runs.
  * "tpu": grid (B, H, N) with the block axis "arbitrary" (sequential on a core) and the state in a VMEM
    scratch, so each step holds one block in VMEM whatever T is (Mosaic TPU). Layout [B, H, T, D] so a block's
    last two dims are (block_size, D), which Mosaic accepts for block_size a multiple of 8.
Backward recomputes states instead of storing them: a forward sweep over blocks gives dq, a reverse sweep of the
state cotangent gives dk and dv (LA-2 Algorithm 2). Accumulation is float32; in bf16 mode float32 operands (state,
masked scores) enter matmuls as bf16 hi + lo pairs, never rounded to bf16 (see `_mm`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu, triton as pltriton

import shapes
from pallas_kernels.backend import triton_width

_F32 = jnp.float32


def _mm(x, y, dims, dtype):
    """Matmul contracting x's dim dims[0] with y's dims[1], float32 accumulation.

    float32 mode: IEEE float32 operands (Triton would otherwise use TF32). bf16 mode: bf16 operands stay bf16; a
    float32 operand (the carried state, masked scores, decayed keys) is split into bf16 hi + lo parts and the
    parts' products are summed (all but lo x lo, ~2^-18 of the product). That keeps it to ~2^-17 relative instead
    of the 2^-9 of rounding it to bf16, on the bf16 MXU / tensor-core path, at one extra matmul per split operand.
    """
    dimension_numbers = (((dims[0],), (dims[1],)), ((), ()))
    if dtype == _F32:
        return lax.dot_general(
            x.astype(_F32), y.astype(_F32), dimension_numbers, preferred_element_type=_F32,
            precision=lax.Precision.HIGHEST,
        )
    mm = lambda a, b: lax.dot_general(a, b, dimension_numbers, preferred_element_type=_F32)  # noqa: E731
    (x_hi, *x_lo), (y_hi, *y_lo) = _bf16_parts(x, dtype), _bf16_parts(y, dtype)
    out = mm(x_hi, y_hi)
    for x_part in x_lo:
        out += mm(x_part, y_hi)
    for y_part in y_lo:
        out += mm(x_hi, y_part)
    return out


def _bf16_parts(x, dtype):
    """(x,) for an operand already in the 16-bit dtype, else (hi, lo) with hi + lo = x to ~2^-18 relative."""
    if x.dtype == dtype:
        return (x,)
    hi = x.astype(dtype)
    return hi, (x - hi.astype(_F32)).astype(dtype)


def _decays(log_decay, block_size, length):
    """Decay factors of a block holding `length` real tokens (the rest zero padding).

    mask_CC[a, b] = lambda^(a-b) for b <= a; q_decay_C1[a] = lambda^(a+1) (incoming state to token a);
    k_decay_C1[b] = lambda^(length-1-b) (token b to the outgoing state); block_decay_11 = lambda^length.
    Every exp is of a vector: on TPU `log_decay` is a scalar read from SMEM, the scalar core has no
    transcendental unit, and a scalar exp was reported to fail Mosaic's verification.
    """
    C = block_size
    row_CC = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    col_CC = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    # Clamp exponents before exp so lambda^(negative) never overflows into inf * 0 = nan.
    diff_CC = jnp.maximum(row_CC - col_CC, 0).astype(_F32)
    mask_CC = jnp.where(row_CC >= col_CC, jnp.exp(diff_CC * log_decay), 0.0)
    row_C1 = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    q_decay_C1 = jnp.exp((row_C1 + 1).astype(_F32) * log_decay)
    k_exp_C1 = length - 1 - row_C1
    k_decay_C1 = jnp.where(k_exp_C1 >= 0, jnp.exp(jnp.maximum(k_exp_C1, 0).astype(_F32) * log_decay), 0.0)
    block_decay_11 = jnp.exp(jnp.full((1, 1), length.astype(_F32) * log_decay))
    return mask_CC, q_decay_C1, k_decay_C1, block_decay_11


def _forward_block(q_CD, k_CD, v_CE, state_DE, log_decay, length, block_size):
    """Output of one block (intra: masked-decay left product; inter: incoming state) and the outgoing state."""
    dt = q_CD.dtype
    mask_CC, q_decay_C1, k_decay_C1, block_decay_11 = _decays(log_decay, block_size, length)
    scores_CC = _mm(q_CD, k_CD, (1, 1), dt) * mask_CC
    o_CE = _mm(scores_CC, v_CE, (1, 0), dt) + _mm(q_CD, state_DE, (1, 0), dt) * q_decay_C1
    state_DE = block_decay_11 * state_DE + _mm(k_CD * k_decay_C1, v_CE, (0, 0), dt)
    return o_CE, state_DE


def _dq_block(k_CD, v_CE, do_CE, state_DE, log_decay, length, block_size):
    """dq of one block given its incoming state; also advances the state (forward sweep)."""
    dt = k_CD.dtype
    mask_CC, q_decay_C1, k_decay_C1, block_decay_11 = _decays(log_decay, block_size, length)
    dscores_CC = _mm(do_CE, v_CE, (1, 1), dt) * mask_CC
    dq_CD = _mm(dscores_CC, k_CD, (1, 0), dt) + _mm(do_CE, state_DE, (1, 1), dt) * q_decay_C1
    state_DE = block_decay_11 * state_DE + _mm(k_CD * k_decay_C1, v_CE, (0, 0), dt)
    return dq_CD, state_DE


def _dkdv_block(q_CD, k_CD, v_CE, do_CE, dstate_DE, log_decay, length, block_size):
    """dk, dv of one block given the cotangent of its outgoing state; returns that of its incoming state."""
    dt = q_CD.dtype
    mask_CC, q_decay_C1, k_decay_C1, block_decay_11 = _decays(log_decay, block_size, length)
    scores_CC = _mm(q_CD, k_CD, (1, 1), dt) * mask_CC
    dscores_CC = _mm(do_CE, v_CE, (1, 1), dt) * mask_CC
    dk_CD = _mm(dscores_CC, q_CD, (0, 0), dt) + _mm(v_CE, dstate_DE, (1, 1), dt) * k_decay_C1
    dv_CE = _mm(scores_CC, do_CE, (0, 0), dt) + _mm(k_CD, dstate_DE, (1, 0), dt) * k_decay_C1
    dstate_DE = block_decay_11 * dstate_DE + _mm(q_CD * q_decay_C1, do_CE, (0, 0), dt)
    return dk_CD, dv_CE, dstate_DE


def _block_length(i, seq_len, block_size):
    return jnp.minimum(block_size, seq_len - i * block_size)


def _cost(operands, out_shape, *, blocks, C, D, E, cc, de, decay_passes=1):
    """CostEstimate of a call over `blocks` (B * H * N) blocks, each doing `cc` pairs of C x C scores products
    (over D and over E) and `de` C x D x E state products, and computing its decays `decay_passes` times. Counts
    the model's FLOPs (not bf16 mode's hi/lo split or the GPU's per-value-tile recompute)."""
    return pl.CostEstimate(
        flops=2 * blocks * C * (cc * C * (D + E) + de * D * E),
        transcendentals=decay_passes * blocks * (C * C + 2 * C + 1),
        bytes_accessed=_nbytes(operands, out_shape),
    )


def _nbytes(*trees):
    """Bytes of every array (or ShapeDtypeStruct) in the trees: each is read or written once."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(trees))


# ---------------------------------------------------------------- GPU wrapper: grid (B, H), in-kernel block loop


def _gpu_forward_kernel(log_decay_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, sT_ref, *, seq_len, block_size):
    num_blocks = q_ref.shape[0] // block_size
    log_decay = log_decay_ref[0]

    def step(i, state_DE):
        rows = pl.ds(pl.multiple_of(i * block_size, block_size), block_size)
        o_CE, state_DE = _forward_block(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], state_DE, log_decay,
            _block_length(i, seq_len, block_size), block_size,
        )
        o_ref[rows, :] = o_CE.astype(o_ref.dtype)
        return state_DE

    sT_ref[...] = lax.fori_loop(0, num_blocks, step, s0_ref[...])


def _gpu_backward_kernel(
    log_decay_ref, q_ref, k_ref, v_ref, do_ref, s0_ref, dsT_ref, dq_ref, dk_ref, dv_ref, ds0_ref, *, seq_len, block_size
):
    num_blocks = q_ref.shape[0] // block_size
    log_decay = log_decay_ref[0]

    def forward_step(i, state_DE):
        rows = pl.ds(pl.multiple_of(i * block_size, block_size), block_size)
        dq_CD, state_DE = _dq_block(
            k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], state_DE, log_decay,
            _block_length(i, seq_len, block_size), block_size,
        )
        dq_ref[rows, :] = dq_CD.astype(dq_ref.dtype)
        return state_DE

    def reverse_step(i, dstate_DE):
        j = num_blocks - 1 - i
        rows = pl.ds(pl.multiple_of(j * block_size, block_size), block_size)
        dk_CD, dv_CE, dstate_DE = _dkdv_block(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], dstate_DE, log_decay,
            _block_length(j, seq_len, block_size), block_size,
        )
        dk_ref[rows, :] = dk_CD.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv_CE.astype(dv_ref.dtype)
        return dstate_DE

    lax.fori_loop(0, num_blocks, forward_step, s0_ref[...])
    ds0_ref[...] = lax.fori_loop(0, num_blocks, reverse_step, dsT_ref[...])


def _gpu_specs(Tp, D, value_block):
    """Block specs for grid (B, H, E // value_block): each program owns one (batch, head, value tile)."""
    qk = pl.BlockSpec((None, Tp, None, D), lambda b, h, e: (b, 0, h, 0))
    vo = pl.BlockSpec((None, Tp, None, value_block), lambda b, h, e: (b, 0, h, e))
    state = pl.BlockSpec((None, None, D, value_block), lambda b, h, e: (b, h, 0, e))
    head = pl.BlockSpec((1,), lambda b, h, e: (h,))
    return qk, vo, state, head


def _gpu_forward(q, k, v, log_decay_H, s0, *, seq_len, block_size, value_block, interpret):
    B, Tp, H, D = q.shape
    E = v.shape[-1]
    qk, vo, state, head = _gpu_specs(Tp, D, value_block)
    operands = (log_decay_H, q, k, v, s0)
    out_shape = (jax.ShapeDtypeStruct((B, Tp, H, E), q.dtype), jax.ShapeDtypeStruct((B, H, D, E), _F32))
    return pl.pallas_call(
        functools.partial(_gpu_forward_kernel, seq_len=seq_len, block_size=block_size),
        out_shape=out_shape,
        grid=(B, H, E // value_block),
        in_specs=[head, qk, qk, vo, state],
        out_specs=(vo, state),
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        cost_estimate=_cost(operands, out_shape, blocks=B * H * (Tp // block_size), C=block_size, D=D, E=E, cc=1, de=2),
        name="lightning_attention_fwd",
    )(*operands)


def _gpu_backward(q, k, v, log_decay_H, s0, do, dsT, *, seq_len, block_size, value_block, interpret):
    B, Tp, H, D = q.shape
    E = v.shape[-1]
    num_tiles = E // value_block
    qk, vo, state, head = _gpu_specs(Tp, D, value_block)
    # dq and dk sum over the value dim, so each value tile writes a float32 partial that is summed afterwards.
    partial = pl.BlockSpec((None, None, Tp, None, D), lambda b, h, e: (e, b, 0, h, 0))
    operands = (log_decay_H, q, k, v, do, s0, dsT)
    out_shape = (
        jax.ShapeDtypeStruct((num_tiles, *q.shape), _F32), jax.ShapeDtypeStruct((num_tiles, *k.shape), _F32),
        jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((B, H, D, E), _F32),
    )
    dq_parts, dk_parts, dv, ds0 = pl.pallas_call(
        functools.partial(_gpu_backward_kernel, seq_len=seq_len, block_size=block_size),
        out_shape=out_shape,
        grid=(B, H, num_tiles),
        in_specs=[head, qk, qk, vo, vo, state, state],
        out_specs=(partial, partial, vo, state),
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        cost_estimate=_cost(
            operands, out_shape, blocks=B * H * (Tp // block_size), C=block_size, D=D, E=E, cc=3, de=5, decay_passes=2
        ),
        name="lightning_attention_bwd",
    )(*operands)
    return dq_parts.sum(0).astype(q.dtype), dk_parts.sum(0).astype(k.dtype), dv, ds0


# ---------------------------------------------------------------- TPU wrapper: grid (B, H, N), state in VMEM scratch


def _tpu_forward_kernel(log_decay_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, sT_ref, state_ref, *, seq_len, block_size):
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        state_ref[...] = s0_ref[...]

    o_CE, state_DE = _forward_block(
        q_ref[...], k_ref[...], v_ref[...], state_ref[...], log_decay_ref[pl.program_id(1)],
        _block_length(c, seq_len, block_size), block_size,
    )
    o_ref[...] = o_CE.astype(o_ref.dtype)
    state_ref[...] = state_DE

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        sT_ref[...] = state_DE


def _tpu_dq_kernel(log_decay_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, state_ref, *, seq_len, block_size):
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        state_ref[...] = s0_ref[...]

    dq_CD, state_DE = _dq_block(
        k_ref[...], v_ref[...], do_ref[...], state_ref[...], log_decay_ref[pl.program_id(1)],
        _block_length(c, seq_len, block_size), block_size,
    )
    dq_ref[...] = dq_CD.astype(dq_ref.dtype)
    state_ref[...] = state_DE


def _tpu_dkdv_kernel(
    log_decay_ref, q_ref, k_ref, v_ref, do_ref, dsT_ref, dk_ref, dv_ref, ds0_ref, dstate_ref, *, seq_len, block_size
):
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        dstate_ref[...] = dsT_ref[...]

    j = pl.num_programs(2) - 1 - c  # the index maps walk blocks in reverse
    dk_CD, dv_CE, dstate_DE = _dkdv_block(
        q_ref[...], k_ref[...], v_ref[...], do_ref[...], dstate_ref[...], log_decay_ref[pl.program_id(1)],
        _block_length(j, seq_len, block_size), block_size,
    )
    dk_ref[...] = dk_CD.astype(dk_ref.dtype)
    dv_ref[...] = dv_CE.astype(dv_ref.dtype)
    dstate_ref[...] = dstate_DE

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = dstate_DE


def _tpu_call(kernel, operands, out_shape, in_specs, out_specs, *, dims, cc, de, interpret, name):
    """One grid (B, H, N) call with log_decay in SMEM and the D x E state in a VMEM scratch; dims = (B, H, N, C,
    D, E), cc and de as in `_cost`."""
    B, H, N, C, D, E = dims
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(B, H, N),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] + in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((D, E), _F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=_cost(operands, out_shape, blocks=B * H * N, C=C, D=D, E=E, cc=cc, de=de),
        name=name,
    )(*operands)


def _tpu_specs(C, D, E, num_blocks, reverse=False):
    block = (lambda c: num_blocks - 1 - c) if reverse else (lambda c: c)
    seq = lambda width: pl.BlockSpec((None, None, C, width), lambda b, h, c: (b, h, block(c), 0))  # noqa: E731
    state = pl.BlockSpec((None, None, D, E), lambda b, h, c: (b, h, 0, 0))
    return seq, state


def _tpu_dims(q, v, block_size):
    B, H, Tp, D = q.shape
    return B, H, Tp // block_size, block_size, D, v.shape[-1]


def _tpu_forward(q, k, v, log_decay_H, s0, *, seq_len, block_size, interpret):
    dims = B, H, N, C, D, E = _tpu_dims(q, v, block_size)
    seq, state = _tpu_specs(C, D, E, N)
    return _tpu_call(
        functools.partial(_tpu_forward_kernel, seq_len=seq_len, block_size=block_size),
        (log_decay_H, q, k, v, s0),
        (jax.ShapeDtypeStruct((B, H, N * C, E), q.dtype), jax.ShapeDtypeStruct((B, H, D, E), _F32)),
        [seq(D), seq(D), seq(E), state], (seq(E), state),
        dims=dims, cc=1, de=2, interpret=interpret, name="lightning_attention_fwd",
    )


def _tpu_backward(q, k, v, log_decay_H, s0, do, dsT, *, seq_len, block_size, interpret):
    dims = B, H, N, C, D, E = _tpu_dims(q, v, block_size)
    seq, state = _tpu_specs(C, D, E, N)
    dq = _tpu_call(
        functools.partial(_tpu_dq_kernel, seq_len=seq_len, block_size=block_size),
        (log_decay_H, k, v, do, s0),
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        [seq(D), seq(E), seq(E), state], seq(D),
        dims=dims, cc=1, de=2, interpret=interpret, name="lightning_attention_bwd_dq",
    )
    rseq, state = _tpu_specs(C, D, E, N, reverse=True)
    dk, dv, ds0 = _tpu_call(
        functools.partial(_tpu_dkdv_kernel, seq_len=seq_len, block_size=block_size),
        (log_decay_H, q, k, v, do, dsT),
        (
            jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((B, H, D, E), _F32),
        ),
        [rseq(D), rseq(D), rseq(E), rseq(E), state], (rseq(D), rseq(E), state),
        dims=dims, cc=2, de=3, interpret=interpret, name="lightning_attention_bwd_dkdv",
    )
    return dq, dk, dv, ds0


# ---------------------------------------------------------------- custom VJP over the padded, backend-laid-out arrays

def _calls(backend, value_block):
    """(forward, backward) for a backend; `value_block` (GPU only) is the width of a program's value tile."""
    if backend == "gpu":
        return (functools.partial(_gpu_forward, value_block=value_block),
                functools.partial(_gpu_backward, value_block=value_block))
    return _tpu_forward, _tpu_backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _attention(q, k, v, log_decay_H, s0, seq_len, block_size, backend, value_block, interpret):
    forward, _ = _calls(backend, value_block)
    return forward(q, k, v, log_decay_H, s0, seq_len=seq_len, block_size=block_size, interpret=interpret)


def _attention_fwd(q, k, v, log_decay_H, s0, seq_len, block_size, backend, value_block, interpret):
    out = _attention(q, k, v, log_decay_H, s0, seq_len, block_size, backend, value_block, interpret)
    return out, (q, k, v, log_decay_H, s0)


def _attention_bwd(seq_len, block_size, backend, value_block, interpret, residuals, cotangents):
    q, k, v, log_decay_H, s0 = residuals
    do, dsT = cotangents
    _, backward = _calls(backend, value_block)
    dq, dk, dv, ds0 = backward(
        q, k, v, log_decay_H, s0, do.astype(q.dtype), dsT.astype(_F32),
        seq_len=seq_len, block_size=block_size, interpret=interpret,
    )
    # The decay rates are fixed per head (not trained), so they get no gradient.
    return dq, dk, dv, jnp.zeros_like(log_decay_H), ds0


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------- decode: one token per (batch, head) program


def _decode_kernel(decay_ref, q_ref, k_ref, v_ref, state_ref, o_ref, new_state_ref):
    """S' = lambda S + k^T v, o = q S' as broadcasts and a reduction: a 1-row matmul would waste the MXU and
    Triton's tl.dot needs >= 16 rows, while the step is bound by reading and writing S anyway."""
    state_DE = decay_ref[...] * state_ref[...] + k_ref[...].astype(_F32) * v_ref[...].astype(_F32)
    new_state_ref[...] = state_DE
    o_ref[...] = jnp.sum(q_ref[...].astype(_F32) * state_DE, axis=0, keepdims=True).astype(o_ref.dtype)


def pallas_decode_step(q_BHD, k_BHD, v_BHE, decay_H, state_BHDE, *, backend, interpret):
    """One decode token through a Pallas kernel, grid (B, H); the state is updated in place when donated.

    q and k enter as [B, H, D, 1] columns and v as [B, H, 1, E] rows so the outer product is a broadcast, and
    every block's last two dims equal the array's (Mosaic TPU's rule); "gpu" pads D, E for Triton.
    """
    B, H, D = q_BHD.shape
    E = v_BHE.shape[-1]
    Dp, Ep = (triton_width(D), triton_width(E)) if backend == "gpu" else (D, E)
    q = _pad_axis(q_BHD, 2, Dp)[..., None]
    k = _pad_axis(k_BHD, 2, Dp)[..., None]
    v = _pad_axis(v_BHE, 2, Ep)[:, :, None, :]
    state = _pad_axis(_pad_axis(state_BHDE.astype(_F32), 2, Dp), 3, Ep)
    decay_H11 = decay_H.astype(_F32).reshape(H, 1, 1)
    per_head = lambda rows, cols: pl.BlockSpec((None, None, rows, cols), lambda b, h: (b, h, 0, 0))  # noqa: E731
    operands = (decay_H11, q, k, v, state)
    out_shape = (jax.ShapeDtypeStruct((B, H, 1, Ep), q_BHD.dtype), jax.ShapeDtypeStruct((B, H, Dp, Ep), _F32))
    o, new_state = pl.pallas_call(
        _decode_kernel,
        out_shape=out_shape,
        grid=(B, H),
        in_specs=[
            pl.BlockSpec((None, 1, 1), lambda b, h: (h, 0, 0)),
            per_head(Dp, 1), per_head(Dp, 1), per_head(1, Ep), per_head(Dp, Ep),
        ],
        out_specs=(per_head(1, Ep), per_head(Dp, Ep)),
        input_output_aliases={4: 1},
        compiler_params=pltriton.CompilerParams(num_warps=4) if backend == "gpu" and not interpret else None,
        interpret=interpret,
        # Decay, outer product and the q-weighted sum: 4 FLOPs per state element, which is read and written once.
        cost_estimate=pl.CostEstimate(
            flops=4 * state.size, transcendentals=0, bytes_accessed=_nbytes(operands, out_shape)
        ),
        name="lightning_attention_decode",
    )(*operands)
    return o[:, :, 0, :E], new_state[:, :, :D, :E]


def _pad_axis(x, axis, size):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def pallas_attention(
    q_BTHD, k_BTHD, v_BTHE, decay_H, initial_state_BHDE, *, block_size, backend, interpret, value_block=64
):
    """Runs the kernel for `backend` ("gpu" or "tpu"); inputs are validated by the caller.

    Pads T to a multiple of block_size (and, for "gpu", D and E to Triton-friendly widths), lays the arrays out
    for the backend, and undoes both on the way out; autodiff of the padding wraps the custom VJP. On "gpu",
    value tiles of `value_block` columns (a power of two) are separate programs, as in LA-2 and fla, so that
    B * H * E / value_block programs fill the GPU even at batch 1 (q k^T is recomputed per tile).
    """
    B, T, H, D = q_BTHD.shape
    E = v_BTHE.shape[-1]
    Tp = shapes.round_up(T, block_size)
    log_decay_H = jnp.log(decay_H.astype(_F32))
    s0 = initial_state_BHDE.astype(_F32)
    q, k, v = (_pad_axis(x, 1, Tp) for x in (q_BTHD, k_BTHD, v_BTHE))
    if backend == "gpu":
        Dp, Ep = triton_width(D), triton_width(E)
        q, k = _pad_axis(q, 3, Dp), _pad_axis(k, 3, Dp)
        v = _pad_axis(v, 3, Ep)
        s0 = _pad_axis(_pad_axis(s0, 2, Dp), 3, Ep)
        o, sT = _attention(q, k, v, log_decay_H, s0, T, block_size, backend, min(value_block, Ep), interpret)
        return o[:, :T, :, :E], sT[:, :, :D, :E]
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    o, sT = _attention(q, k, v, log_decay_H, s0, T, block_size, backend, None, interpret)
    return o.transpose(0, 2, 1, 3)[:, :T], sT
