"""Causal training attention on TPU through JAX's splash attention kernel (jax.experimental.pallas.ops.tpu).

Splash attention is a block-sparse flash attention with its own forward, dq and dkv Pallas kernels and custom
VJP; for a causal mask it skips the blocks above the diagonal. It takes one sequence as q [N, T, H] and
k, v [K, T, H] (grouped kv heads: query head n reads kv head n // (N / K)) and applies no softmax scale, so the
wrapper scales q, moves heads before positions and maps the kernel over the batch.
"""

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash


def _causal_kernel(num_heads, seq_len, block_size, interpret):
    """The kernel for one (heads, length, block). Built on every trace: splash caches the mask's block structure
    (computed in numpy) itself, and the kernel holds arrays made inside the trace, so it must not be kept."""
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * num_heads)
    b = block_size
    blocks = splash.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention_pallas(q_BTNH, k_BTKH, v_BTKH, *, scale, block_size, interpret):
    """Causal attention o [B, T, N, H]; inputs assumed validated (see splash_attention)."""
    kernel = _causal_kernel(q_BTNH.shape[2], q_BTNH.shape[1], block_size, interpret)
    q_BNTH = (q_BTNH * scale).astype(q_BTNH.dtype).transpose(0, 2, 1, 3)
    k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    return jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH).transpose(0, 2, 1, 3)
