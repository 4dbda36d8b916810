"""The decode cache of a linear-attention layer: its decayed key-value state, and what rolling it back needs.

  S_t = decay * S_{t-1} + k_t^T v_t,   o_t = q_t S_t        (per head; [heads, key_dim, value_dim] float32)

A decayed state cannot be un-decayed, so rolling back keeps a window: the last `rollback_window` keys and values
written and the state before them. Rolling row b back by n tokens recomputes its state from the window start over
the first (kept - n) window tokens; a write that fills the window folds its oldest tokens into the start state:

  S = decay^m S_start + sum_{j<m} decay^(m-1-j) k_j^T v_j,        m = window tokens kept

so any of the last rollback_window tokens can be dropped, however many writes they came in. rollback_window 0
keeps no window, and the state alone is carried (the cheapest decode).

Token trees (models/token_tree.py, STree's tree scan for scalar decays): node i on a path of n_i new nodes sees

  o_i = q_i (decay^(n_i) S_0 + sum_{j ancestor of i, or i} decay^(n_i - n_j) k_j^T v_j)

with S_0 the state before the tree: one masked [T, N] product per head, like a chain of N tokens in quadratic
form. A tree write leaves the state at S_0 and puts its nodes in the window (so it must hold the whole tree);
keep_path moves a path's keys and values together there and recomputes the state after them by the formula above.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels.lightning_attention import lightning_attention, lightning_decode_step
from parallel import mesh as mesh_lib


@flax.struct.dataclass
class LinearState:
    state_BHDE: jax.Array
    decay_H: tuple = flax.struct.field(pytree_node=False)  # the layer's static rates; hashable
    # The rollback window; None without one.
    start_BHDE: jax.Array | None = None
    window_k_BWHD: jax.Array | None = None
    window_v_BWHE: jax.Array | None = None
    window_len_B: jax.Array | None = None  # tokens written since the window start

    @classmethod
    def init(cls, batch_size: int, num_heads: int, key_dim: int, value_dim: int, decay_H: tuple, dtype,
             rollback_window: int = 0) -> "LinearState":
        state_BHDE = jnp.zeros((batch_size, num_heads, key_dim, value_dim), jnp.float32)
        if not rollback_window:
            return cls(state_BHDE, decay_H)
        W = rollback_window
        return cls(state_BHDE, decay_H, state_BHDE, jnp.zeros((batch_size, W, num_heads, key_dim), dtype),
                   jnp.zeros((batch_size, W, num_heads, value_dim), dtype), jnp.zeros((batch_size,), jnp.int32))

    @property
    def capacity(self) -> None:
        return None

    def logical_axes(self) -> "LinearState":
        state = P("cache_batch", "cache_heads", "cache_kv", None)
        if self.window_len_B is None:
            return LinearState(state, self.decay_H)
        window = P("cache_batch", None, "cache_heads", "cache_kv")
        return LinearState(state, self.decay_H, state, window, window, P("cache_batch"))

    def update(self, q_BTHD, k_BTHD, v_BTHE, num_new_B, *, implementation: str, decode_implementation: str,
               block_size: int, tree_mask_TN=None):
        """Outputs of T new tokens continuing each row's state, and the state after them; only row b's first
        num_new_B[b] tokens count (right-padded prompts and chunks). With tree_mask_TN, the tokens are nodes of
        a token tree (see the module docstring)."""
        decay_H = jnp.asarray(self.decay_H, jnp.float32)
        if tree_mask_TN is not None:
            return self._tree_update(q_BTHD, k_BTHD, v_BTHE, num_new_B, tree_mask_TN)
        if q_BTHD.shape[1] == 1:
            sharding = pallas_sharding(decode_implementation, "cache_batch", "cache_heads", self.state_BHDE.shape)
            o_BHE, new_BHDE = lightning_decode_step(q_BTHD[:, 0], k_BTHD[:, 0], v_BTHE[:, 0], decay_H,
                                                    self.state_BHDE, implementation=decode_implementation,
                                                    sharding=sharding)
            # A row that writes nothing (num_new 0: finished in a batch that goes on) keeps its state.
            new_BHDE = jnp.where((num_new_B > 0)[:, None, None, None], new_BHDE, self.state_BHDE)
            o_BTHE = o_BHE[:, None]
        else:
            o_BTHE, new_BHDE = _continue(q_BTHD, k_BTHD, v_BTHE, decay_H, num_new_B, self.state_BHDE,
                                         implementation, block_size)
        return o_BTHE, self._record(new_BHDE, k_BTHD, v_BTHE, num_new_B)

    def _tree_update(self, q_BTHD, k_BTHD, v_BTHE, num_new_B, tree_mask_TN):
        """The outputs of tree nodes; the state stays the one before the tree, the nodes go into the window."""
        T, N = tree_mask_TN.shape
        if self.window_len_B is None or N > self.window_k_BWHD.shape[1]:
            raise ValueError(f"a token tree of {N} nodes needs a rollback window of at least {N} tokens")
        # The tree's earlier nodes (written by the calls just before) are the window's last N - T entries.
        earlier_BM = self.window_len_B[:, None] - (N - T) + jnp.arange(N - T)[None]
        k_BNHD = jnp.concatenate([_take(self.window_k_BWHD, earlier_BM), k_BTHD.astype(self.window_k_BWHD.dtype)], 1)
        v_BNHE = jnp.concatenate([_take(self.window_v_BWHE, earlier_BM), v_BTHE.astype(self.window_v_BWHE.dtype)], 1)
        mask_TN = np.asarray(tree_mask_TN, bool)
        # n_i - n_j for an ancestor j of i counts i's ancestors after j: a cumulative sum along i's row. The
        # exponent is masked before exp: for other nodes it can be negative, and decay^-x overflows.
        nodes_T = mask_TN.sum(axis=1)
        steps_TN = np.where(mask_TN, nodes_T[:, None] - np.cumsum(mask_TN, axis=1), 0)
        log_decay_H = jnp.log(jnp.asarray(self.decay_H, jnp.float32))
        weight_HTN = jnp.where(mask_TN[None], jnp.exp(steps_TN[None] * log_decay_H[:, None, None]), 0.0)
        q_BTHD = q_BTHD.astype(jnp.float32)
        scores_BHTN = jnp.einsum("bthd,bnhd->bhtn", q_BTHD, k_BNHD.astype(jnp.float32)) * weight_HTN[None]
        o_BTHE = jnp.einsum("bhtn,bnhe->bthe", scores_BHTN, v_BNHE.astype(jnp.float32))
        carried_BTHE = jnp.einsum("bthd,bhde->bthe", q_BTHD, self.state_BHDE)
        o_BTHE += carried_BTHE * jnp.exp(nodes_T[None, :, None, None] * log_decay_H[None, None, :, None])
        return o_BTHE.astype(v_BTHE.dtype), self._record(self.state_BHDE, k_BTHD, v_BTHE, num_new_B)

    def _record(self, new_BHDE, k_BTHD, v_BTHE, num_new_B) -> "LinearState":
        """The state after a write, with the written keys and values appended to the rollback window; what
        overflows it is folded into the window's start state."""
        if self.window_len_B is None:
            return self.replace(state_BHDE=new_BHDE)
        W, T = self.window_k_BWHD.shape[1], k_BTHD.shape[1]
        slots_BT = jnp.where(jnp.arange(T)[None] < num_new_B[:, None], self.window_len_B[:, None] + jnp.arange(T)[None],
                             W + T)
        append = jax.vmap(lambda buffer_UX, new_TX, slots_T: buffer_UX.at[slots_T].set(new_TX, mode="drop"))

        def extend(window_BWX, new_BTX):  # [B, W + T]: the window, then the new entries
            buffer_BUX = jnp.concatenate([window_BWX, jnp.zeros_like(new_BTX, window_BWX.dtype)], axis=1)
            return append(buffer_BUX, new_BTX.astype(window_BWX.dtype), slots_BT)

        k_BUHD, v_BUHE = extend(self.window_k_BWHD, k_BTHD), extend(self.window_v_BWHE, v_BTHE)
        total_B = self.window_len_B + num_new_B
        evicted_B = jnp.maximum(total_B - W, 0)
        kept_BW = evicted_B[:, None] + jnp.arange(W)[None]  # < W + T, as evicted <= num_new <= T
        start_BHDE = self._fold(self.start_BHDE, k_BUHD, v_BUHE, evicted_B)
        return self.replace(state_BHDE=new_BHDE,
                            start_BHDE=jnp.where((evicted_B > 0)[:, None, None, None], start_BHDE, self.start_BHDE),
                            window_k_BWHD=_take(k_BUHD, kept_BW), window_v_BWHE=_take(v_BUHE, kept_BW),
                            window_len_B=total_B - evicted_B)

    def _fold(self, start_BHDE, k_BUHD, v_BUHE, count_B):
        """decay^m S_start + sum_{j<m} decay^(m-1-j) k_j^T v_j with m = count_B, over the first m entries."""
        U = k_BUHD.shape[1]
        log_decay_H = jnp.log(jnp.asarray(self.decay_H, jnp.float32))
        # Token j reaches the state decayed m-1-j times; the exponent is masked before exp (it is negative past m).
        exponent_BU = count_B[:, None] - 1 - jnp.arange(U)[None]
        weight_BUH = jnp.where(exponent_BU[..., None] >= 0,
                               jnp.exp(jnp.maximum(exponent_BU, 0)[..., None] * log_decay_H[None, None]), 0.0)
        folded_BHDE = jnp.einsum("buh,buhd,buhe->bhde", weight_BUH, k_BUHD.astype(jnp.float32),
                                 v_BUHE.astype(jnp.float32))
        return folded_BHDE + jnp.exp(count_B[:, None] * log_decay_H[None])[..., None, None] * start_BHDE

    def rollback(self, num_dropped_B: jax.Array) -> "LinearState":
        """Drops each row's last num_dropped_B tokens, as far back as the window start (no further)."""
        if self.window_len_B is None:
            return self  # no window: only a rollback of nothing is possible
        kept_B = jnp.clip(self.window_len_B - num_dropped_B, 0, self.window_len_B)
        recomputed_BHDE = self._fold(self.start_BHDE, self.window_k_BWHD, self.window_v_BWHE, kept_B)
        rolled_back_B = (num_dropped_B > 0)[:, None, None, None]
        return self.replace(state_BHDE=jnp.where(rolled_back_B, recomputed_BHDE, self.state_BHDE),
                            window_len_B=kept_B)

    def keep_path(self, start_B, num_written_B, path_BL, path_len_B) -> "LinearState":
        """Of a tree (the last num_written_B tokens, all in the window), keeps nodes path_BL[b, :path_len_B[b]] in
        that order: they move together in the window and the state becomes the state after them."""
        del start_B  # the window says it all
        W, L = self.window_k_BWHD.shape[1], path_BL.shape[1]
        base_B = self.window_len_B - num_written_B
        l_L = jnp.arange(L)[None]
        targets_BL = jnp.where(l_L < path_len_B[:, None], base_B[:, None] + l_L, W)  # W: dropped
        move = jax.vmap(lambda window_WX, source_L, target_L: window_WX.at[target_L].set(
            window_WX[jnp.clip(source_L, 0, W - 1)], mode="drop"))
        sources_BL = base_B[:, None] + path_BL
        window_k_BWHD = move(self.window_k_BWHD, sources_BL, targets_BL)
        window_v_BWHE = move(self.window_v_BWHE, sources_BL, targets_BL)
        kept_B = base_B + path_len_B
        recomputed_BHDE = self._fold(self.start_BHDE, window_k_BWHD, window_v_BWHE, kept_B)
        return self.replace(state_BHDE=jnp.where((num_written_B > 0)[:, None, None, None], recomputed_BHDE,
                                                 self.state_BHDE),
                            window_k_BWHD=window_k_BWHD, window_v_BWHE=window_v_BWHE, window_len_B=kept_B)


def _take(x_BWX, index_BM):
    """Row b's entries at index_BM[b] along axis 1."""
    return jnp.take_along_axis(x_BWX, index_BM.reshape(index_BM.shape + (1,) * (x_BWX.ndim - 2)), axis=1)


def pallas_sharding(implementation: str, batch: str, heads: str, x_BH):
    """Kernels run per shard of the mesh (parallel.mesh.kernel_sharding); the jnp paths are XLA's to partition."""
    return mesh_lib.kernel_sharding(batch, heads, x_BH) if implementation == "pallas" else None


def _left_align(x_BT, shift_B):
    """Moves row b's first T - shift_B[b] entries to its end (a right-padded row becomes left-padded)."""
    T = x_BT.shape[1]
    return _take(x_BT, (jnp.arange(T)[None, :] - shift_B[:, None]) % T)


def _continue(q_BTHD, k_BTHD, v_BTHE, decay_H, num_new_B, state_BHDE, implementation, block_size):
    """Several tokens after a state, rows of different lengths. Rows are left-aligned so every row's last token ends
    the pass: padding (with zero keys) then adds nothing and decays nothing that matters. The carried state's share,
    decay^(j+1) q_j S0, is added outside the kernel so the padding cannot decay it."""
    B, T = q_BTHD.shape[:2]
    shift_B = T - num_new_B
    valid_BT = jnp.arange(T)[None, :] >= shift_B[:, None]
    q_BTHD, v_BTHE = _left_align(q_BTHD, shift_B), _left_align(v_BTHE, shift_B)
    k_BTHD = jnp.where(valid_BT[..., None, None], _left_align(k_BTHD, shift_B), 0)
    o_BTHE, new_BHDE = lightning_attention(q_BTHD, k_BTHD, v_BTHE, decay_H, implementation=implementation,
                                           block_size=block_size,
                                           sharding=pallas_sharding(implementation, "cache_batch", "cache_heads",
                                                                    state_BHDE.shape))
    steps_BT = jnp.maximum(jnp.arange(T)[None, :] - shift_B[:, None] + 1, 0)  # tokens since the state
    carried_BTHE = jnp.einsum("bthd,bhde->bthe", q_BTHD.astype(jnp.float32), state_BHDE)
    carried_BTHE = carried_BTHE * decay_H[None, None, :, None] ** steps_BT[..., None, None]
    o_BTHE = o_BTHE + carried_BTHE.astype(o_BTHE.dtype)
    new_BHDE = new_BHDE + decay_H[None, :, None, None] ** num_new_B[:, None, None, None] * state_BHDE
    return _left_align(o_BTHE, -shift_B), new_BHDE
