"""Flash-decoding over a MatryoshkaKV compressed cache, in Pallas: the query projection into each head's key basis
and the output's return from its value basis happen inside the kernel, beside the per-head rank masks.

The cache holds R <= head_dim columns per head, [B, K, S, R]; decode reads it once, which is where the saving is
(R / head_dim of the uncompressed cache's bytes). The work per (sequence, kv head, split) program:

1. q_c = q U_k [G, R] for the group's G query heads, columns at or past the head's key rank zeroed. A cache
   written at a higher rank is then read at the lower one: ranks can drop at decode time without a rewrite.
2. Online softmax of q_c . k_c^T * scale over the split's blocks below the sequence's length (blocks past it are
   never loaded), as pallas_kernels/decode_attention does: running max m, sum l, unnormalised acc [G, R].
3. acc, columns at or past the value rank zeroed, goes back through U_v^T to [G, H]. The split merge is linear in
   acc, so merging the [G, H] partials (decode_attention's combine) equals merging first and projecting after.

The GPU wrapper (Triton) pads every dimension to a power of two >= 16: q and the bases are small and cheap to
pad; the cache is padded only when R is not such a width, which copies it, so the dispatcher refuses that when
compiling for a GPU. The TPU wrapper (Mosaic) prefetches lengths and ranks into SMEM and takes full-size trailing
block dims. On CPU either runs in interpret mode. The tiling is decode_attention's BlockSizes, resolved at width R.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu, triton as pltriton

import shapes
from pallas_kernels.backend import triton_width
from pallas_kernels.decode_attention.kernel import _combine  # the same log-sum-exp merge of split partials

# TPU stores m and l lane-dense as [G, 128]; GPU stores them as [G, 1].
_TPU_LANES = 128


def _dot(a, b, contract, precision):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _attend_split(length, key_rank, value_rank, *refs, scale, block, blocks_per_split, projected):
    """q_ref [G, H] through uk_ref [H, R], attending to this split's blocks of k_ref/v_ref [split_len, R] below
    `length`, back through uv_ref [H, R]; unless not `projected`, where q_ref is [G, R] already in the key basis
    and the output stays in the value basis (no uk_ref, uv_ref). Row statistics stay 2-D [G, 1] (Mosaic lays out
    vectors in 2-D tiles)."""
    if projected:
        q_ref, uk_ref, k_ref, v_ref, uv_ref, o_ref, m_ref, l_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, m_ref, l_ref = refs
    split_start = pl.program_id(2) * blocks_per_split * block
    num_blocks = jnp.clip((length - split_start + block - 1) // block, 0, blocks_per_split)
    q_GH = q_ref[...]
    group, rank = q_GH.shape[0], k_ref.shape[-1]
    # fp32 inputs get IEEE matmuls (Triton would otherwise use TF32); bf16 inputs accumulate in fp32 either way.
    precision = jax.lax.Precision.HIGHEST if q_GH.dtype == jnp.float32 else None
    columns_1R = jax.lax.broadcasted_iota(jnp.int32, (1, rank), 1)
    qc_GR = _dot(q_GH, uk_ref[...], ((1,), (0,)), precision) if projected else q_GH
    qc_GR = jnp.where(columns_1R < key_rank, qc_GR, 0.0).astype(k_ref.dtype)

    def visit_block(j, carry):
        m_G1, l_G1, acc_GR = carry
        start = pl.multiple_of(j * block, block)
        k_TR = k_ref[pl.ds(start, block), :]
        v_TR = v_ref[pl.ds(start, block), :]
        s_GT = _dot(qc_GR, k_TR, ((1,), (1,)), precision) * scale
        pos_1T = split_start + start + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        s_GT = jnp.where(pos_1T < length, s_GT, -jnp.inf)
        # Masked V rows are zeroed too: p = 0 there, but 0 * NaN in the dot would still poison acc.
        pos_T1 = split_start + start + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
        v_TR = jnp.where(pos_T1 < length, v_TR, jnp.zeros_like(v_TR))
        # Every visited block has a valid position, so m_new is finite and exp never sees inf - inf.
        m_new_G1 = jnp.maximum(m_G1, jnp.max(s_GT, axis=1, keepdims=True))
        alpha_G1 = jnp.exp(m_G1 - m_new_G1)
        p_GT = jnp.exp(s_GT - m_new_G1)
        l_new_G1 = alpha_G1 * l_G1 + jnp.sum(p_GT, axis=1, keepdims=True)
        pv_GR = _dot(p_GT.astype(v_TR.dtype), v_TR, ((1,), (0,)), precision)
        return m_new_G1, l_new_G1, alpha_G1 * acc_GR + pv_GR

    init = (
        jnp.full((group, 1), -jnp.inf, jnp.float32),
        jnp.zeros((group, 1), jnp.float32),
        jnp.zeros((group, rank), jnp.float32),
    )
    m_G1, l_G1, acc_GR = jax.lax.fori_loop(0, num_blocks, visit_block, init)
    acc_GR = jnp.where(columns_1R < value_rank, acc_GR, 0.0)
    if projected:
        uv_HR = uv_ref[...]
        acc_GR = _dot(acc_GR.astype(uv_HR.dtype), uv_HR, ((1,), (1,)), precision)
    o_ref[...] = acc_GR
    m_ref[...] = jnp.broadcast_to(m_G1, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l_G1, l_ref.shape)


def _gpu_kernel(length_ref, key_rank_ref, value_rank_ref, *refs, **static):
    _attend_split(length_ref[0], key_rank_ref[0], value_rank_ref[0], *refs, **static)


def _tpu_kernel(lengths_ref, key_ranks_ref, value_ranks_ref, *refs, **static):
    head = pl.program_id(1)
    _attend_split(lengths_ref[pl.program_id(0)], key_ranks_ref[head], value_ranks_ref[head], *refs, **static)


def _partials_shapes(q_BKGH, num_splits, stats_width):
    batch, kv_heads, group, head_dim = q_BKGH.shape
    stats = jax.ShapeDtypeStruct((batch, kv_heads, num_splits, group, stats_width), jnp.float32)
    return [jax.ShapeDtypeStruct((batch, kv_heads, num_splits, group, head_dim), jnp.float32), stats, stats]


def _cost(q_BKGH, k_BKSR, num_splits, out_shape, projected):
    """Upper bound (every position valid): q.k and p.v at width R, the two basis products per split, one exp per
    score, the cache read once."""
    batch, kv_heads, group, head_dim = q_BKGH.shape
    rank = k_BKSR.shape[3]
    scores = batch * kv_heads * group * k_BKSR.shape[2]
    projections = 2 * 2 * batch * kv_heads * num_splits * group * head_dim * rank * projected
    read = (q_BKGH.size + 2 * k_BKSR.size + 2 * kv_heads * head_dim * rank * projected) * k_BKSR.dtype.itemsize
    written = sum(s.size * 4 for s in out_shape)
    return pl.CostEstimate(flops=4 * scores * rank + projections, transcendentals=scores,
                           bytes_accessed=read + written)


def _gpu_partials(q_BKGH, uk_KHR, k_BKSR, v_BKSR, uv_KHR, lengths_B, key_ranks_K, value_ranks_K, *, static, blocks,
                  split_len, interpret):
    projected = static["projected"]
    batch, kv_heads, group, head_dim = q_BKGH.shape
    rank = k_BKSR.shape[3]
    out_shape = _partials_shapes(q_BKGH, blocks.num_splits, 1)
    kv_spec = pl.BlockSpec((None, None, split_len, rank), lambda b, h, s: (b, h, s, 0))
    basis_spec = pl.BlockSpec((None, head_dim, rank), lambda b, h, s: (h, 0, 0))
    head_scalar = pl.BlockSpec((1,), lambda b, h, s: (h,))
    return pl.pallas_call(
        functools.partial(_gpu_kernel, **static),
        grid=(batch, kv_heads, blocks.num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (b,)),
            head_scalar,
            head_scalar,
            pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0)),
            *[basis_spec] * projected,
            kv_spec,
            kv_spec,
            *[basis_spec] * projected,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group, 1), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group, 1), lambda b, h, s: (b, h, s, 0, 0)),
        ],
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        cost_estimate=_cost(q_BKGH, k_BKSR, blocks.num_splits, out_shape, projected),
        name="low_rank_decode_attention_partials",
    )(lengths_B, key_ranks_K, value_ranks_K, *_operands(q_BKGH, uk_KHR, k_BKSR, v_BKSR, uv_KHR, projected))


def _operands(q_BKGH, uk_KHR, k_BKSR, v_BKSR, uv_KHR, projected):
    return (q_BKGH, uk_KHR, k_BKSR, v_BKSR, uv_KHR) if projected else (q_BKGH, k_BKSR, v_BKSR)


def _tpu_partials(q_BKGH, uk_KHR, k_BKSR, v_BKSR, uv_KHR, lengths_B, key_ranks_K, value_ranks_K, *, static, blocks,
                  split_len, interpret):
    projected = static["projected"]
    batch, kv_heads, group, head_dim = q_BKGH.shape
    rank = k_BKSR.shape[3]
    out_shape = _partials_shapes(q_BKGH, blocks.num_splits, _TPU_LANES)

    def kv_index(b, h, s, lengths_ref, key_ranks_ref, value_ranks_ref):
        # A split past the length maps to the last needed split: an unchanged block index means no new DMA.
        last_split = jnp.maximum(lengths_ref[b] - 1, 0) // split_len
        return b, h, jnp.minimum(s, last_split), 0

    kv_spec = pl.BlockSpec((None, None, split_len, rank), kv_index)
    basis_spec = pl.BlockSpec((None, head_dim, rank), lambda b, h, s, *_: (h, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, kv_heads, blocks.num_splits),
        in_specs=[
            pl.BlockSpec((None, None, group, head_dim), lambda b, h, s, *_: (b, h, 0, 0)),
            *[basis_spec] * projected,
            kv_spec,
            kv_spec,
            *[basis_spec] * projected,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s, *_: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group, _TPU_LANES), lambda b, h, s, *_: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, group, _TPU_LANES), lambda b, h, s, *_: (b, h, s, 0, 0)),
        ],
    )
    return pl.pallas_call(
        functools.partial(_tpu_kernel, **static),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        cost_estimate=_cost(q_BKGH, k_BKSR, blocks.num_splits, out_shape, projected),
        name="low_rank_decode_attention_partials",
    )(lengths_B, key_ranks_K, value_ranks_K, *_operands(q_BKGH, uk_KHR, k_BKSR, v_BKSR, uv_KHR, projected))


@functools.partial(jax.jit, static_argnames=("scale", "blocks", "backend", "interpret"))
def low_rank_decode_attention_pallas(q_BNH, k_BKSR, v_BKSR, lengths_B, key_basis_KHR, value_basis_KHR, key_ranks_K,
                                     value_ranks_K, *, scale, blocks, backend, interpret):
    """q [B, N, H] over the compressed k/v [B, K, S, R] with bases [K, H, R] and ranks [K] -> o [B, N, H]; with
    both bases None, q [B, N, R] already in the key basis -> o [B, N, R] in the value basis.

    Inputs are assumed validated and `blocks` resolved for the backend and width R (the dispatcher does both)."""
    projected = key_basis_KHR is not None
    batch, num_heads, head_dim = q_BNH.shape
    kv_heads, cache_len, rank = k_BKSR.shape[1:]
    group = num_heads // kv_heads
    lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, cache_len)
    key_ranks_K = jnp.clip(key_ranks_K.astype(jnp.int32), 0, rank)
    value_ranks_K = jnp.clip(value_ranks_K.astype(jnp.int32), 0, rank)
    if backend == "gpu":
        group_pad, head_pad, rank_pad = triton_width(group), triton_width(head_dim), triton_width(rank)
        cache_pad = shapes.round_up(cache_len, blocks.block_size)
    else:
        group_pad, head_pad, rank_pad, cache_pad = shapes.round_up(group, 8), head_dim, rank, cache_len
    q_BKGH = q_BNH.reshape(batch, kv_heads, group, head_dim)
    q_BKGH = jnp.pad(q_BKGH, ((0, 0), (0, 0), (0, group_pad - group), (0, head_pad - head_dim)))
    # The bases in q's dtype: the kernel's dots take operands of one dtype. Zero rows and columns of padding
    # contribute nothing and come out as zero output columns.
    basis_pad = ((0, 0), (0, head_pad - head_dim), (0, rank_pad - rank))
    uk_KHR = jnp.pad(key_basis_KHR.astype(q_BNH.dtype), basis_pad) if projected else None
    uv_KHR = jnp.pad(value_basis_KHR.astype(q_BNH.dtype), basis_pad) if projected else None
    kv_pad = ((0, 0), (0, 0), (0, cache_pad - cache_len), (0, rank_pad - rank))
    if kv_pad != ((0, 0),) * 4:  # copies the cache: only in interpret mode, or a cache_len off the block size
        k_BKSR, v_BKSR = jnp.pad(k_BKSR, kv_pad), jnp.pad(v_BKSR, kv_pad)

    blocks_per_split = blocks.split_blocks(cache_len)
    partials = _gpu_partials if backend == "gpu" else _tpu_partials
    o_BKPGH, m_BKPG1, l_BKPG1 = partials(
        q_BKGH, uk_KHR, k_BKSR, v_BKSR, uv_KHR, lengths_B, key_ranks_K, value_ranks_K,
        static=dict(scale=scale, block=blocks.block_size, blocks_per_split=blocks_per_split, projected=projected),
        blocks=blocks,
        split_len=blocks_per_split * blocks.block_size,
        interpret=interpret,
    )
    o_BKGH = _combine(o_BKPGH, m_BKPG1[..., 0], l_BKPG1[..., 0])
    return o_BKGH[:, :, :group, :head_dim].reshape(batch, num_heads, head_dim).astype(q_BNH.dtype)
