"""Grouped-query attention with RoPE over its own KV cache (models/kv_cache.py), and the implementation switch.

The switch (`Config.softmax_implementation`):
  reference  plain jnp softmax attention; the ground truth the others are tested against
  xla        jax.nn.dot_product_attention(implementation="xla")
  cudnn      jax.nn.dot_product_attention(implementation="cudnn") for the causal forward (GPU only)
  pallas     the Pallas flash-decoding kernel for one-token decode steps over the cache
  splash     JAX's Pallas splash-attention kernel (TPU) for the causal forward and backward of sequences whose length
             is a multiple of 128 (others take the XLA path); decode steps as under xla
Training under `pallas` uses the XLA path; attention over a cache outside the decode kernel is plain einsums on the
cache layout for every implementation (KVCache.attend). Kernels run per shard of the mesh (kernel_sharding).

With kv_rank > 0 (MatryoshkaKV, models/matryoshka_kv.py) the post-RoPE queries, keys and values are mapped to
kv_rank columns of each head's basis before attention and the output back after it; the cache is then the
compressed models/low_rank_kv_cache.py, and attention in between is the same code at width kv_rank.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import token_tree
from models.kv_cache import KVCache
from models.layers import RMSNorm, dense_init
from models.low_rank_kv_cache import LowRankKVCache
from models.matryoshka_kv import MatryoshkaKV
from models.rope import Rope
from pallas_kernels.splash_attention import splash_attention
from parallel import mesh as mesh_lib

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "pallas", "splash")


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
    if implementation == "splash" and q_BTNH.shape[1] % 128 == 0:
        sharding = mesh_lib.kernel_sharding("act_batch", "act_heads", (q_BTNH.shape[0], k_BTKH.shape[2]))
        return splash_attention(q_BTNH, k_BTKH, v_BTKH, sharding=sharding)
    xla_or_cudnn = "cudnn" if implementation == "cudnn" else "xla"
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=xla_or_cudnn)


class Attention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: Rope
    implementation: str
    dtype: jnp.dtype
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-5
    out_init_scale: float = 1.0
    kv_rank: int = 0  # MatryoshkaKV columns cached per head; 0: uncompressed
    kv_key_ranks: tuple = ()  # per KV head, each <= kv_rank; () = all kv_rank
    kv_value_ranks: tuple = ()

    def init_cache(self, batch_size: int, cache_len: int, rollback_window: int = 0) -> KVCache | LowRankKVCache:
        del rollback_window  # any write can be rolled back (kv_cache.py)
        if self.kv_rank:
            return LowRankKVCache.init(batch_size, self.num_kv_heads, cache_len, self.head_dim, self.kv_rank,
                                       *self._kv_ranks(), self.dtype)
        return KVCache.init(batch_size, self.num_kv_heads, cache_len, self.head_dim, self.dtype)

    def _kv_ranks(self) -> tuple[tuple, tuple]:
        every = (self.kv_rank,) * self.num_kv_heads
        return tuple(self.kv_key_ranks) or every, tuple(self.kv_value_ranks) or every

    @nn.compact
    def __call__(self, x_BTD, positions_BT, num_new_B=None, cache: KVCache | LowRankKVCache | None = None,
                 tree_mask_TN=None):
        """Without a cache: causal attention over the sequence. With one: the tokens are written at their
        positions and attend to everything the cache holds up to their own position; or, the nodes of a token
        tree (models/token_tree.py), written after the prefix, attend to the prefix and their ancestors."""
        del num_new_B  # tokens past a row's count are written past its length, where no later query looks
        D = x_BTD.shape[-1]

        def project(name, num_heads, heads_axis):
            kernel_DNH = self.param(f"{name}_kernel", nn.with_logical_partitioning(
                dense_init(in_axis=0, out_axis=(1, 2)), ("embed", heads_axis, "kv")),
                (D, num_heads, self.head_dim), jnp.float32)
            out_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, kernel_DNH.astype(self.dtype))
            if self.qkv_bias:
                bias_NH = self.param(f"{name}_bias", nn.with_logical_partitioning(
                    nn.initializers.zeros, (heads_axis, "kv")), (num_heads, self.head_dim), jnp.float32)
                out_BTNH = out_BTNH + bias_NH.astype(self.dtype)[None, None]
            return out_BTNH

        q_BTNH = project("query", self.num_heads, "heads")
        k_BTKH = project("key", self.num_kv_heads, "kv_heads")
        v_BTKH = project("value", self.num_kv_heads, "kv_heads")
        if self.qk_norm:
            q_BTNH = RMSNorm(self.norm_eps, self.dtype, "kv", name="query_norm")(q_BTNH)
            k_BTKH = RMSNorm(self.norm_eps, self.dtype, "kv", name="key_norm")(k_BTKH)
        q_BTNH = nn.with_logical_constraint(self.rope(q_BTNH, positions_BT),
                                            ("act_batch", "act_len", "act_heads", "kv"))
        k_BTKH = nn.with_logical_constraint(self.rope(k_BTKH, positions_BT),
                                            ("act_batch", "act_len", "act_kv_heads", "kv"))

        if self.kv_rank:
            matryoshka = MatryoshkaKV(self.num_kv_heads, self.head_dim, self.kv_rank, *self._kv_ranks(), self.dtype,
                                      name="matryoshka_kv")
            q_BTNH, k_BTKH, v_BTKH = matryoshka.compress(q_BTNH, k_BTKH, v_BTKH)  # last axis now kv_rank

        if cache is None:
            out_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, self.implementation)
        else:
            slots_BT = positions_BT if tree_mask_TN is None else token_tree.write_slots(positions_BT, tree_mask_TN)
            cache = cache.write(k_BTKH, v_BTKH, slots_BT)
            out_BTNH = cache.attend(q_BTNH, positions_BT, self.implementation, tree_mask_TN, slots_BT)
        # MatryoshkaKV's decode form has U_v^T and mu_v folded into the output projection (matryoshka_kv.py).
        folded = self.kv_rank and matryoshka.is_decode_form()
        if self.kv_rank and not folded:
            out_BTNH = matryoshka.expand(out_BTNH)

        out_kernel_NHD = self.param("out_kernel", nn.with_logical_partitioning(
            dense_init(self.out_init_scale, in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")),
            (self.num_heads, out_BTNH.shape[-1], D), jnp.float32)
        # Heads merged first: as a two-axis contraction XLA:CPU transposes the kernel on every call.
        B, T = out_BTNH.shape[:2]
        out_kernel_FD = out_kernel_NHD.reshape(-1, D).astype(self.dtype)
        out_BTD = jnp.einsum("btf,fd->btd", out_BTNH.reshape(B, T, -1), out_kernel_FD)
        if folded:
            out_BTD = out_BTD + self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                                           (D,), jnp.float32).astype(self.dtype)[None, None]
        return out_BTD, cache
