"""The key/value cache of a softmax attention layer: created, written and read by models/attention.py only.

Keys and values are stored [batch, kv_heads, cache_len, head_dim], the layout attention reads them in, so no step
copies the cache. A key at slot s is seen by a query at position p iff s <= p; that also hides entries past a
row's length, which is why rolling back needs no change to the arrays: the next write overwrites them. Nodes of a
token tree (models/token_tree.py) see the slots before the tree and their ancestors in it; keeping one path of the
tree moves its entries to contiguous slots.
"""

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from models import token_tree
from pallas_kernels.decode_attention import decode_attention
from parallel import mesh as mesh_lib


@flax.struct.dataclass
class KVCache:
    k_BKSH: jax.Array
    v_BKSH: jax.Array

    @classmethod
    def init(cls, batch_size: int, num_kv_heads: int, cache_len: int, head_dim: int, dtype) -> "KVCache":
        shape = (batch_size, num_kv_heads, cache_len, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def capacity(self) -> int:
        return self.k_BKSH.shape[2]

    def logical_axes(self) -> "KVCache":
        axes = P("cache_batch", "cache_heads", "cache_len", "cache_kv")
        return KVCache(axes, axes)

    def rollback(self, num_dropped_B: jax.Array) -> "KVCache":
        return self  # dropped entries lie past the new lengths: invisible, and overwritten by the next write

    def keep_path(self, start_B, num_written_B, path_BL, path_len_B) -> "KVCache":
        """Of a tree written at slots start_B + node, keeps nodes path_BL[b, :path_len_B[b]] at slots start_B + l."""
        del num_written_B  # the slots say it all
        L = path_BL.shape[1]
        source_BL = start_B[:, None] + path_BL
        target_BL = jnp.where(jnp.arange(L)[None] < path_len_B[:, None], start_B[:, None] + jnp.arange(L)[None],
                              self.capacity)  # capacity: dropped
        return KVCache(_move(self.k_BKSH, source_BL, target_BL), _move(self.v_BKSH, source_BL, target_BL))

    def write(self, k_BTKH, v_BTKH, slots_BT) -> "KVCache":
        """Each row's new keys and values at its own slots; slots past the cache are dropped."""
        return KVCache(_write(self.k_BKSH, k_BTKH, slots_BT), _write(self.v_BKSH, v_BTKH, slots_BT))

    def attend(self, q_BTNH, positions_BT, implementation: str, tree_mask_TN=None, slots_BT=None):
        """Attention of new queries (already written into the cache) over it: up to their own positions, or for
        the nodes of a tree (tree_mask_TN, written at slots_BT) the prefix and their ancestors. One-token steps
        with implementation "pallas" run the flash-decoding kernel; everything else is plain einsums."""
        if implementation == "pallas" and q_BTNH.shape[1] == 1 and tree_mask_TN is None:
            return decode_attention(q_BTNH[:, 0], self.k_BKSH, self.v_BKSH, positions_BT[:, 0] + 1,
                                    sharding=mesh_lib.kernel_sharding("cache_batch", "cache_heads",
                                                                      self.k_BKSH.shape))[:, None]
        B, T, N, H = q_BTNH.shape
        K, S = self.k_BKSH.shape[1:3]
        G = N // K
        # The dots get one batch dimension, Z = (b, k), with M = (g, t) rows: XLA:CPU runs a dot with two batch
        # dimensions as many tiny matmuls, several times slower at decode shapes. float32 operands: XLA:CPU has no
        # bf16 x bf16 -> f32 dot, and the softmax wants float32 anyway.
        q_ZMH = jnp.einsum("btkgh->bkgth", q_BTNH.reshape(B, T, K, G, H)).reshape(B * K, G * T, H).astype(jnp.float32)
        k_ZSH = self.k_BKSH.reshape(B * K, S, H).astype(jnp.float32)
        v_ZSH = self.v_BKSH.reshape(B * K, S, H).astype(jnp.float32)
        logits_BKGTS = jnp.einsum("zmh,zsh->zms", q_ZMH, k_ZSH).reshape(B, K, G, T, S) * H**-0.5
        if tree_mask_TN is None:
            visible_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
        else:
            visible_BTS = token_tree.visible(tree_mask_TN, slots_BT, S)
        logits_BKGTS = jnp.where(visible_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
        probs_ZMS = jax.nn.softmax(logits_BKGTS, axis=-1).reshape(B * K, G * T, S)
        out_ZMH = jnp.einsum("zms,zsh->zmh", probs_ZMS, v_ZSH)
        out_BTKGH = jnp.einsum("bkgth->btkgh", out_ZMH.reshape(B, K, G, T, H))
        return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


def _write(cache_BKSH, new_BTKH, slots_BT):
    """The write goes through the same [batch * kv_heads, S, H] view that attention reads the cache in. Written in
    the [B, K, S, H] shape, at batch 1 XLA:CPU fuses the update once into the reader's reshape and once into the
    carried cache, and copies the whole cache every decode step to keep both."""
    B, K, S, H = cache_BKSH.shape
    T = new_BTKH.shape[1]
    cache_ZSH = cache_BKSH.reshape(B * K, S, H)
    new_ZTH = jnp.swapaxes(new_BTKH, 1, 2).reshape(B * K, T, H).astype(cache_BKSH.dtype)
    slots_ZT = jnp.repeat(slots_BT, K, axis=0)
    cache_ZSH = jax.vmap(lambda c_SH, n_TH, s_T: c_SH.at[s_T].set(n_TH, mode="drop"))(cache_ZSH, new_ZTH, slots_ZT)
    return cache_ZSH.reshape(B, K, S, H)


def _move(cache_BKSH, source_BL, target_BL):
    """Copies each row's entries at source slots to target slots (all read before any is written)."""
    B, K, S, H = cache_BKSH.shape
    cache_ZSH = cache_BKSH.reshape(B * K, S, H)
    source_ZL, target_ZL = jnp.repeat(source_BL, K, axis=0), jnp.repeat(target_BL, K, axis=0)
    move = jax.vmap(lambda c_SH, s_L, t_L: c_SH.at[t_L].set(c_SH[jnp.clip(s_L, 0, S - 1)], mode="drop"))
    return move(cache_ZSH, source_ZL, target_ZL).reshape(B, K, S, H)
