"""Flash-decoding in Pallas: one query token per sequence attends to a KV cache with ragged lengths.

Decode attention is bandwidth-bound (about 2 * group / bytes_per_elem FLOP per cached byte), so the kernel is
built to stream each needed K and V element from memory exactly once:

1. The cache length S is cut into `num_splits` contiguous splits of `blocks_per_split * block` positions. The
   grid is (batch, kv_head, split); a program owns all `group` query heads of its kv head, so under GQA a K/V
   block is loaded once and used by every query head that shares it.
2. A program loops over its split's blocks only up to the sequence's length: blocks at or past lengths_B[b]
   are never loaded. Per block it computes fp32 scores q·kᵀ, masks positions past the length (the last block
   is usually partial) and updates a running max m, sum l and unnormalised output acc (online softmax).
3. Each split writes its partial (acc, m, l); a jnp combine rescales every split by exp(m_split - m_max) and
   divides by the rescaled l (log-sum-exp merge). Splits give a batch-1 decode enough programs to fill a GPU.

The kernel body is shared. The GPU wrapper (Triton lowering: refs point at HBM, loads happen inside the loop)
and the TPU wrapper (Mosaic: lengths scalar-prefetched into SMEM, a split's K/V DMA'd to VMEM, splits past the
length re-use the last needed block index so the pipeline issues no DMA for them) differ only in padding, grid
spec and compiler params. On CPU either runs in interpret mode. The tiling comes from block_sizes.py.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu, triton as pltriton

import shapes
from pallas_kernels.backend import triton_width

# TPU stores m and l lane-dense as [G, 128]; GPU stores them as [G, 1].
_TPU_LANES = 128


def _attend_split(length, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, scale, block, blocks_per_split):
    """Online softmax of q_ref [G, H] over this split's blocks of k_ref/v_ref [split_len, H] below `length`.

    Row statistics stay 2-D [G, 1] (Mosaic lays out vectors in 2-D tiles; Triton is indifferent)."""
    split_start = pl.program_id(2) * blocks_per_split * block
    # Only blocks holding a position below the length are visited; the rest are skipped, never loaded.
    num_blocks = jnp.clip((length - split_start + block - 1) // block, 0, blocks_per_split)
    q_GH = q_ref[...]
    group = q_GH.shape[0]
    # fp32 inputs get IEEE matmuls (Triton would otherwise use TF32); bf16 inputs accumulate in fp32 either way.
    precision = jax.lax.Precision.HIGHEST if q_GH.dtype == jnp.float32 else None

    def visit_block(j, carry):
        m_G1, l_G1, acc_GH = carry
        start = pl.multiple_of(j * block, block)
        k_TH = k_ref[pl.ds(start, block), :]
        v_TH = v_ref[pl.ds(start, block), :]
        s_GT = jax.lax.dot_general(
            q_GH, k_TH, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        ) * scale
        pos_1T = split_start + start + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        s_GT = jnp.where(pos_1T < length, s_GT, -jnp.inf)
        # Masked V rows are zeroed too: p = 0 there, but 0 * NaN in the dot would still poison acc.
        pos_T1 = split_start + start + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
        v_TH = jnp.where(pos_T1 < length, v_TH, jnp.zeros_like(v_TH))
        # Every visited block has a valid position, so m_new is finite and exp never sees inf - inf.
        m_new_G1 = jnp.maximum(m_G1, jnp.max(s_GT, axis=1, keepdims=True))
        alpha_G1 = jnp.exp(m_G1 - m_new_G1)
        p_GT = jnp.exp(s_GT - m_new_G1)
        l_new_G1 = alpha_G1 * l_G1 + jnp.sum(p_GT, axis=1, keepdims=True)
        pv_GH = jax.lax.dot_general(
            p_GT.astype(v_TH.dtype), v_TH, (((1,), (0,)), ((), ())),
            precision=precision, preferred_element_type=jnp.float32,
        )
        return m_new_G1, l_new_G1, alpha_G1 * acc_GH + pv_GH

    init = (
        jnp.full((group, 1), -jnp.inf, jnp.float32),
        jnp.zeros((group, 1), jnp.float32),
        jnp.zeros(q_GH.shape, jnp.float32),
    )
    m_G1, l_G1, acc_GH = jax.lax.fori_loop(0, num_blocks, visit_block, init)
    o_ref[...] = acc_GH
    m_ref[...] = jnp.broadcast_to(m_G1, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l_G1, l_ref.shape)


def _gpu_kernel(length_ref, *refs, **static):
    _attend_split(length_ref[0], *refs, **static)


def _tpu_kernel(lengths_ref, *refs, **static):
    _attend_split(lengths_ref[pl.program_id(0)], *refs, **static)


def _partials_shapes(q_BKGH, num_splits, stats_width):
    batch, kv_heads, group, head_dim = q_BKGH.shape
    stats = jax.ShapeDtypeStruct((batch, kv_heads, num_splits, group, stats_width), jnp.float32)
    return [jax.ShapeDtypeStruct((batch, kv_heads, num_splits, group, head_dim), jnp.float32), stats, stats]


def _cost(q_BKGH, k_BKSH, out_shape):
    """Upper bound (every position valid): q·kᵀ and p·v, one exp per score, the cache read once."""
    batch, kv_heads, group, head_dim = q_BKGH.shape
    scores = batch * kv_heads * group * k_BKSH.shape[2]
    read = (q_BKGH.size + 2 * k_BKSH.size) * k_BKSH.dtype.itemsize
    written = sum(s.size * 4 for s in out_shape)
    return pl.CostEstimate(flops=4 * scores * head_dim, transcendentals=scores, bytes_accessed=read + written)


def _gpu_partials(q_BKGH, k_BKSH, v_BKSH, lengths_B, *, static, blocks, split_len, interpret):
    batch, kv_heads, group, head_dim = q_BKGH.shape
    out_shape = _partials_shapes(q_BKGH, blocks.num_splits, 1)
    kv_spec = pl.BlockSpec((None, None, split_len, head_dim), lambda b, h, s: (b, h, s, 0))
    return pl.pallas_call(
        functools.partial(_gpu_kernel, **static),
        grid=(batch, kv_heads, blocks.num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group, 1), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group, 1), lambda b, h, s: (b, h, s, 0, 0)),
        ],
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        cost_estimate=_cost(q_BKGH, k_BKSH, out_shape),
        name="decode_attention_partials",
    )(lengths_B, q_BKGH, k_BKSH, v_BKSH)


def _tpu_partials(q_BKGH, k_BKSH, v_BKSH, lengths_B, *, static, blocks, split_len, interpret):
    batch, kv_heads, group, head_dim = q_BKGH.shape
    out_shape = _partials_shapes(q_BKGH, blocks.num_splits, _TPU_LANES)

    def kv_index(b, h, s, lengths_ref):
        # A split past the length maps to the last needed split: an unchanged block index means no new DMA.
        last_split = jnp.maximum(lengths_ref[b] - 1, 0) // split_len
        return b, h, jnp.minimum(s, last_split), 0

    kv_spec = pl.BlockSpec((None, None, split_len, head_dim), kv_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, kv_heads, blocks.num_splits),
        in_specs=[
            pl.BlockSpec((None, None, group, head_dim), lambda b, h, s, lengths_ref: (b, h, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s, lengths_ref: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group, _TPU_LANES), lambda b, h, s, lengths_ref: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group, _TPU_LANES), lambda b, h, s, lengths_ref: (b, h, s, 0, 0)),
        ],
    )
    return pl.pallas_call(
        functools.partial(_tpu_kernel, **static),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        cost_estimate=_cost(q_BKGH, k_BKSH, out_shape),
        name="decode_attention_partials",
    )(lengths_B, q_BKGH, k_BKSH, v_BKSH)


def _combine(o_BKPGH, m_BKPG, l_BKPG):
    """Log-sum-exp merge of per-split partials over axis P; a sequence with no valid position gets zeros."""
    # JAX's own flash-decoding combine (pallas/ops/gpu/decode_attention.py, b/389925439) needs this barrier: without
    # it XLA's fusion of the max into the rescaling produced NaNs and invalid values after GPU compilation.
    m_BKG = jax.lax.optimization_barrier(jnp.max(m_BKPG, axis=2))
    # All splits empty (length 0) leaves m = -inf; shift by 0 so the weights are exp(-inf) = 0, not NaN.
    w_BKPG = jnp.exp(m_BKPG - jnp.where(jnp.isfinite(m_BKG), m_BKG, 0.0)[:, :, None])
    l_BKG = jnp.sum(w_BKPG * l_BKPG, axis=2)
    o_BKGH = jnp.sum(w_BKPG[..., None] * o_BKPGH, axis=2)
    return o_BKGH / jnp.where(l_BKG == 0.0, 1.0, l_BKG)[..., None]


@functools.partial(jax.jit, static_argnames=("scale", "blocks", "backend", "interpret"))
def decode_attention_pallas(q_BNH, k_BKSH, v_BKSH, lengths_B, *, scale, blocks, backend, interpret):
    """Flash-decoding of q [B, N, H] over k/v [B, K, S, H]; backend "gpu" or "tpu" picks the wrapper.

    Inputs are assumed validated and `blocks` resolved for the backend and these shapes (BlockSizes.resolve, as
    decode_attention does): nothing here checks them.
    """
    batch, num_heads, head_dim = q_BNH.shape
    kv_heads, cache_len = k_BKSH.shape[1], k_BKSH.shape[2]
    group = num_heads // kv_heads
    # Lengths past the cache would count padding as valid; negative lengths mean empty.
    lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, cache_len)
    if backend == "gpu":
        # Triton needs power-of-two tensor sizes and dot operands of at least 16 along every dim. Padding q is
        # cheap; padding K/V copies the cache, which never happens for head_dim 64/128 and cache_len a multiple
        # of block_size (how the model allocates it). Loads past S would read out of bounds, so S is padded too.
        group_pad, head_pad = triton_width(group), triton_width(head_dim)
        cache_pad = shapes.round_up(cache_len, blocks.block_size)
    else:
        # Mosaic takes full-size trailing block dims, rows padded to the 8 sublanes; a partial last split is
        # padded by the pipeline and masked by the length, so the cache is never copied.
        group_pad, head_pad, cache_pad = shapes.round_up(group, 8), head_dim, cache_len
    q_BKGH = q_BNH.reshape(batch, kv_heads, group, head_dim)
    q_BKGH = jnp.pad(q_BKGH, ((0, 0), (0, 0), (0, group_pad - group), (0, head_pad - head_dim)))
    kv_pad = ((0, 0), (0, 0), (0, cache_pad - cache_len), (0, head_pad - head_dim))
    if kv_pad != ((0, 0),) * 4:
        k_BKSH, v_BKSH = jnp.pad(k_BKSH, kv_pad), jnp.pad(v_BKSH, kv_pad)

    blocks_per_split = blocks.split_blocks(cache_len)
    partials = _gpu_partials if backend == "gpu" else _tpu_partials
    o_BKPGH, m_BKPG1, l_BKPG1 = partials(
        q_BKGH, k_BKSH, v_BKSH, lengths_B,
        static=dict(scale=scale, block=blocks.block_size, blocks_per_split=blocks_per_split),
        blocks=blocks,
        split_len=blocks_per_split * blocks.block_size,
        interpret=interpret,
    )
    o_BKGH = _combine(o_BKPGH, m_BKPG1[..., 0], l_BKPG1[..., 0])
    return o_BKGH[:, :, :group, :head_dim].reshape(batch, num_heads, head_dim).astype(q_BNH.dtype)
