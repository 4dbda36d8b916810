"""Grouped-query attention with RoPE, an explicit KV cache, and the attention-implementation switch.

The switch (`Config.attention`):
  reference  plain jnp softmax attention; the ground truth the others are tested against
  xla        jax.nn.dot_product_attention(implementation="xla")
  cudnn      jax.nn.dot_product_attention(implementation="cudnn") for the causal forward (GPU only)
  pallas     the Pallas flash-decoding kernel for one-token decode steps over the cache
Training under `pallas` uses the XLA path; attention over a cache outside the decode kernel is plain einsums on the
cache layout for every implementation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import kv_cache
from models.layers import RMSNorm, dense_init
from models.rope import apply_rope
from pallas_kernels.decode_attention import decode_attention

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "pallas")


def reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Softmax attention in float32 with query heads grouped over key/value heads."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H).astype(jnp.float32)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH.astype(jnp.float32)) * H**-0.5
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH.astype(jnp.float32))
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


def causal_attention(q_BTNH, k_BTKH, v_BTKH, implementation: str):
    """Attention of a sequence over itself (training, and prompts without a cache)."""
    if implementation == "reference":
        T = q_BTNH.shape[1]
        causal_TT = jnp.tril(jnp.ones((T, T), bool))
        return reference_attention(q_BTNH, k_BTKH, v_BTKH, jnp.broadcast_to(causal_TT, (q_BTNH.shape[0], T, T)))
    xla_or_cudnn = "cudnn" if implementation == "cudnn" else "xla"
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=xla_or_cudnn)


def cached_attention(q_BTNH, cache: kv_cache.LayerKV, positions_BT, implementation: str):
    """Attention of new tokens over the cache, which already holds them; a key at position s is seen by a
    query at position p iff s <= p, which also hides stale entries past each sequence's length. Outside the
    Pallas decode kernel it is computed on the cache's own [B, K, S, H] layout, so no step copies the cache."""
    if implementation == "pallas" and q_BTNH.shape[1] == 1:
        out_BNH = decode_attention(q_BTNH[:, 0], cache.k_BKSH, cache.v_BKSH, positions_BT[:, 0] + 1)
        return out_BNH[:, None]
    B, T, N, H = q_BTNH.shape
    K, S = cache.k_BKSH.shape[1:3]
    G = N // K
    # The dots get one batch dimension, Z = (b, k), with M = (g, t) rows: XLA:CPU runs a dot with two batch
    # dimensions as many tiny matmuls, several times slower at decode shapes. float32 operands: XLA:CPU has no
    # bf16 x bf16 -> f32 dot, and the softmax wants float32 anyway.
    q_ZMH = jnp.einsum("btkgh->bkgth", q_BTNH.reshape(B, T, K, G, H)).reshape(B * K, G * T, H).astype(jnp.float32)
    k_ZSH = cache.k_BKSH.reshape(B * K, S, H).astype(jnp.float32)
    v_ZSH = cache.v_BKSH.reshape(B * K, S, H).astype(jnp.float32)
    logits_BKGTS = jnp.einsum("zmh,zsh->zms", q_ZMH, k_ZSH).reshape(B, K, G, T, S) * H**-0.5
    visible_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
    logits_BKGTS = jnp.where(visible_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_ZMS = jax.nn.softmax(logits_BKGTS, axis=-1).reshape(B * K, G * T, S)
    out_ZMH = jnp.einsum("zms,zsh->zmh", probs_ZMS, v_ZSH)
    out_BTKGH = jnp.einsum("bkgth->btkgh", out_ZMH.reshape(B, K, G, T, H))
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


class Attention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    implementation: str
    dtype: jnp.dtype
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-5
    out_init_scale: float = 1.0

    @nn.compact
    def __call__(self, x_BTD, positions_BT, inv_freq_F, cache: kv_cache.LayerKV | None = None):
        D = x_BTD.shape[-1]

        def project(name, num_heads, heads_axis):
            kernel_DNH = self.param(f"{name}_kernel", nn.with_logical_partitioning(
                dense_init(in_axis=0, out_axis=(1, 2)), ("embed", heads_axis, "kv")),
                (D, num_heads, self.head_dim), jnp.float32)
            out_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, kernel_DNH.astype(self.dtype))
            if self.qkv_bias:
                bias_NH = self.param(f"{name}_bias", nn.with_logical_partitioning(
                    nn.initializers.zeros, (heads_axis, "kv")), (num_heads, self.head_dim), jnp.float32)
                out_BTNH = out_BTNH + bias_NH.astype(self.dtype)
            return out_BTNH

        q_BTNH = project("query", self.num_heads, "heads")
        k_BTKH = project("key", self.num_kv_heads, "kv_heads")
        v_BTKH = project("value", self.num_kv_heads, "kv_heads")
        if self.qk_norm:
            q_BTNH = RMSNorm(self.norm_eps, self.dtype, "kv", name="query_norm")(q_BTNH)
            k_BTKH = RMSNorm(self.norm_eps, self.dtype, "kv", name="key_norm")(k_BTKH)
        q_BTNH = nn.with_logical_constraint(apply_rope(q_BTNH, positions_BT, inv_freq_F),
                                            ("act_batch", "act_len", "act_heads", "kv"))
        k_BTKH = nn.with_logical_constraint(apply_rope(k_BTKH, positions_BT, inv_freq_F),
                                            ("act_batch", "act_len", "act_kv_heads", "kv"))

        if cache is None:
            out_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, self.implementation)
        else:
            cache = kv_cache.LayerKV(kv_cache.write(cache.k_BKSH, k_BTKH, positions_BT),
                                     kv_cache.write(cache.v_BKSH, v_BTKH, positions_BT))
            out_BTNH = cached_attention(q_BTNH, cache, positions_BT, self.implementation)

        out_kernel_NHD = self.param("out_kernel", nn.with_logical_partitioning(
            dense_init(self.out_init_scale, in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")),
            (self.num_heads, self.head_dim, D), jnp.float32)
        # Heads merged first: as a two-axis contraction XLA:CPU transposes the kernel on every call.
        B, T = out_BTNH.shape[:2]
        out_kernel_FD = out_kernel_NHD.reshape(self.num_heads * self.head_dim, D).astype(self.dtype)
        out_BTD = jnp.einsum("btf,fd->btd", out_BTNH.reshape(B, T, -1), out_kernel_FD)
        return out_BTD, cache
