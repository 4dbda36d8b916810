"""The compressed key/value cache of a MatryoshkaKV attention layer (models/matryoshka_kv.py): created, written and
read by models/attention.py only.

Each head's keys and values are stored as their first kv_rank coordinates in the head's basis,
[batch, kv_heads, cache_len, kv_rank], kv_rank <= head_dim. Heads with a lower rank of their own keep zeros in the
columns past it (the layer masks them before writing), so one padded width serves every head and the attention
over it is the ordinary one at width kv_rank: the arrays sit in a KVCache, whose writes, rollback, tree paths and
attention (einsums, or the flash-decoding kernel) apply unchanged. The ranks are static fields, for the sizes.
"""

import flax.struct
import jax

from models.kv_cache import KVCache


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
        value basis (MatryoshkaKV.expand takes it back to head_dim)."""
        return self.columns.attend(q_BTNR, positions_BT, implementation, tree_mask_TN, slots_BT)
