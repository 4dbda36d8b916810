"""The compressed key/value cache of a MatryoshkaKV attention layer (models/matryoshka_kv.py): created, written and
read by models/attention.py only.

Each head's keys and values are stored as their first kv_rank coordinates in the head's basis,
[batch, kv_heads, cache_len, kv_rank], kv_rank <= head_dim. Heads with a lower rank of their own keep zeros in the
columns past it (the layer masks them before writing), so one padded width serves every head and the attention
over it is the ordinary one at width kv_rank: the arrays sit in a KVCache, whose writes, rollback, tree paths and
attention einsums apply unchanged. One-token decode steps under implementation "pallas" run the compressed-cache
kernel (pallas_kernels/low_rank_decode_attention) with the heads' rank masks. The ranks are static fields.
"""

import flax.struct
import jax
import jax.numpy as jnp

from models.kv_cache import KVCache
from pallas_kernels.low_rank_decode_attention import low_rank_decode_attention
from parallel import mesh as mesh_lib


@flax.struct.dataclass
class LowRankKVCache:
    columns: KVCache  # k_BKSH, v_BKSH with H = kv_rank
    head_dim: int = flax.struct.field(pytree_node=False)
    key_ranks: tuple = flax.struct.field(pytree_node=False)  # per KV head, each <= kv_rank
    value_ranks: tuple = flax.struct.field(pytree_node=False)

    @classmethod
    def init(cls, batch_size: int, num_kv_heads: int, cache_len: int, head_dim: int, kv_rank: int, key_ranks,
             value_ranks, dtype) -> "LowRankKVCache":
        columns = KVCache.init(batch_size, num_kv_heads, cache_len, kv_rank, dtype)
        return cls(columns, head_dim, tuple(key_ranks), tuple(value_ranks))

    @property
    def capacity(self) -> int:
        return self.columns.capacity

    @property
    def kv_rank(self) -> int:
        return self.columns.k_BKSH.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes the cache's arrays take (every head padded to kv_rank)."""
        return self.columns.k_BKSH.nbytes + self.columns.v_BKSH.nbytes

    @property
    def ranked_nbytes(self) -> int:
        """Bytes of the columns within each head's own rank: what ragged per-head storage would take."""
        B, _, S, _ = self.columns.k_BKSH.shape
        return B * S * (sum(self.key_ranks) + sum(self.value_ranks)) * self.columns.k_BKSH.dtype.itemsize

    @property
    def uncompressed_nbytes(self) -> int:
        """Bytes of the KVCache the uncompressed layer would hold."""
        return self.nbytes // self.kv_rank * self.head_dim

    def logical_axes(self) -> "LowRankKVCache":
        return LowRankKVCache(self.columns.logical_axes(), self.head_dim, self.key_ranks, self.value_ranks)

    def rollback(self, num_dropped_B: jax.Array) -> "LowRankKVCache":
        return self.replace(columns=self.columns.rollback(num_dropped_B))

    def keep_path(self, start_B, num_written_B, path_BL, path_len_B) -> "LowRankKVCache":
        return self.replace(columns=self.columns.keep_path(start_B, num_written_B, path_BL, path_len_B))

    def write(self, k_BTKR, v_BTKR, slots_BT) -> "LowRankKVCache":
        """Compressed keys and values (MatryoshkaKV.compress) at each row's slots; slots past the cache dropped."""
        return self.replace(columns=self.columns.write(k_BTKR, v_BTKR, slots_BT))

    def attend(self, q_BTNR, positions_BT, implementation: str, tree_mask_TN=None, slots_BT=None):
        """Compressed queries over the compressed cache, as KVCache.attend: [B, T, N, kv_rank] in each head's
        value basis (MatryoshkaKV.expand takes it back to head_dim). The queries come scaled for logits at
        kv_rank^-0.5 (MatryoshkaKV.compress), as KVCache.attend and the kernel apply them."""
        if implementation == "pallas" and q_BTNR.shape[1] == 1 and tree_mask_TN is None:
            k_BKSR, v_BKSR = self.columns.k_BKSH, self.columns.v_BKSH
            sharding = mesh_lib.kernel_sharding("cache_batch", "cache_heads", k_BKSR.shape)
            return low_rank_decode_attention(q_BTNR[:, 0], k_BKSR, v_BKSR, positions_BT[:, 0] + 1, None, None,
                                             jnp.asarray(self.key_ranks, jnp.int32),
                                             jnp.asarray(self.value_ranks, jnp.int32), sharding=sharding)[:, None]
        return self.columns.attend(q_BTNR, positions_BT, implementation, tree_mask_TN, slots_BT)
