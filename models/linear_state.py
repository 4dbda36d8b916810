"""The decode cache of a linear-attention layer: its decayed key-value state, and what rolling it back needs.

  S_t = decay * S_{t-1} + k_t^T v_t,   o_t = q_t S_t        (per head; [heads, key_dim, value_dim] float32)

A decayed state cannot be un-decayed, so rolling back keeps a window: the state at the window's start and the keys
and values written since (at most `rollback_window` tokens). Rolling row b back by n tokens recomputes its state
from the window start over the first (written - n) window tokens:

  S = decay^m S_start + sum_{j<m} decay^(m-1-j) k_j^T v_j,        m = tokens kept since the window start

A write that would overflow the window starts a new one at that write, so the tokens of the latest write (if it
fits) can always be rolled back; a longer write (a prompt) leaves an empty window after it. rollback_window 0 keeps
no window, and the state alone is carried (the cheapest decode).
"""

import flax.struct
import jax
import jax.numpy as jnp
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
               block_size: int):
        """Outputs of T new tokens continuing each row's state, and the state after them; only row b's first
        num_new_B[b] tokens count (right-padded prompts and chunks)."""
        decay_H = jnp.asarray(self.decay_H, jnp.float32)
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

    def _record(self, new_BHDE, k_BTHD, v_BTHE, num_new_B) -> "LinearState":
        """The state after a write, with the written keys and values appended to the rollback window."""
        if self.window_len_B is None:
            return self.replace(state_BHDE=new_BHDE)
        W, T = self.window_k_BWHD.shape[1], k_BTHD.shape[1]
        overflow_B = self.window_len_B + num_new_B > W
        fits_B = num_new_B <= W
        # Overflowing rows start a new window at this write (before it if it fits, after it if it does not).
        start_BHDE = jnp.where(overflow_B[:, None, None, None],
                               jnp.where(fits_B[:, None, None, None], self.state_BHDE, new_BHDE), self.start_BHDE)
        base_B = jnp.where(overflow_B, 0, self.window_len_B)
        written_B = jnp.where(fits_B, num_new_B, 0)
        slots_BT = base_B[:, None] + jnp.arange(T)[None]
        slots_BT = jnp.where(jnp.arange(T)[None] < written_B[:, None], slots_BT, W)  # W: dropped
        append = jax.vmap(lambda window_WX, new_TX, slots_T: window_WX.at[slots_T].set(new_TX, mode="drop"))
        return self.replace(
            state_BHDE=new_BHDE, start_BHDE=start_BHDE,
            window_k_BWHD=append(self.window_k_BWHD, k_BTHD.astype(self.window_k_BWHD.dtype), slots_BT),
            window_v_BWHE=append(self.window_v_BWHE, v_BTHE.astype(self.window_v_BWHE.dtype), slots_BT),
            window_len_B=base_B + written_B)

    def rollback(self, num_dropped_B: jax.Array) -> "LinearState":
        """Drops each row's last num_dropped_B tokens, as far back as the window start (no further)."""
        if self.window_len_B is None:
            return self  # no window: only a rollback of nothing is possible
        W = self.window_k_BWHD.shape[1]
        kept_B = jnp.clip(self.window_len_B - num_dropped_B, 0, self.window_len_B)
        log_decay_H = jnp.log(jnp.asarray(self.decay_H, jnp.float32))
        # Token j reaches the state decayed m-1-j times; the exponent is masked before exp (it is negative past m).
        exponent_BW = kept_B[:, None] - 1 - jnp.arange(W)[None]
        weight_BWH = jnp.where(exponent_BW[..., None] >= 0,
                               jnp.exp(jnp.maximum(exponent_BW, 0)[..., None] * log_decay_H[None, None]), 0.0)
        recomputed_BHDE = jnp.einsum("bwh,bwhd,bwhe->bhde", weight_BWH, self.window_k_BWHD.astype(jnp.float32),
                                     self.window_v_BWHE.astype(jnp.float32))
        recomputed_BHDE += jnp.exp(kept_B[:, None] * log_decay_H[None])[..., None, None] * self.start_BHDE
        rolled_back_B = (num_dropped_B > 0)[:, None, None, None]
        return self.replace(state_BHDE=jnp.where(rolled_back_B, recomputed_BHDE, self.state_BHDE),
                            window_len_B=kept_B)


def pallas_sharding(implementation: str, batch: str, heads: str, x_BH):
    """Kernels run per shard of the mesh (parallel.mesh.kernel_sharding); the jnp paths are XLA's to partition."""
    return mesh_lib.kernel_sharding(batch, heads, x_BH) if implementation == "pallas" else None


def _left_align(x_BT, shift_B):
    """Moves row b's first T - shift_B[b] entries to its end (a right-padded row becomes left-padded)."""
    T = x_BT.shape[1]
    source_BT = (jnp.arange(T)[None, :] - shift_B[:, None]) % T
    return jnp.take_along_axis(x_BT, source_BT.reshape(source_BT.shape + (1,) * (x_BT.ndim - 2)), axis=1)


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
