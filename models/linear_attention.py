"""TransNormerLLM-style token mixer on Lightning Attention-2: a constant-size state instead of a growing cache.

  q, k = silu(W_q x), silu(W_k x);  v = W_v x
  o    = RMSNorm(lightning_attention(q, k, v, decay))  * sigmoid(W_up W_down x)      (output gate, low rank)
  out  = W_o o

Per-head decay rates are ALiBi slopes s_h, made gentler with depth (TNL): decay_h = exp(-s_h (1 - l/(L-1))), so
the first layer forgets fastest and the last barely at all.
"""

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from models.layers import RMSNorm, dense_init
from pallas_kernels.lightning_attention import lightning_attention, lightning_decode_step


@flax.struct.dataclass
class LinearState:
    """One linear-attention layer's decayed key-value state, [batch, heads, head_dim, head_dim], float32."""

    state_BHDE: jax.Array

    def logical_axes(self) -> "LinearState":
        return LinearState(P("cache_batch", "cache_heads", "cache_kv", None))


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's geometric slopes 2^(-8(h+1)/H); other head counts interleave the two nearest powers of two."""
    def power_of_two_slopes(n):
        return [2 ** (-8 * (h + 1) / n) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return np.array(power_of_two_slopes(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two_slopes(2 * closest)[0::2][:num_heads - closest]
    return np.array(power_of_two_slopes(closest) + extra)


def layer_decay(num_heads: int, layer_index: int, num_layers: int) -> np.ndarray:
    depth_scale = 1 - layer_index / max(num_layers - 1, 1) + 1e-5
    return np.exp(-alibi_slopes(num_heads) * depth_scale).astype(np.float32)


def _left_align(x_BT, shift_B):
    """Moves row b's first T - shift_B[b] entries to its end (a right-padded row becomes left-padded)."""
    T = x_BT.shape[1]
    source_BT = (jnp.arange(T)[None, :] - shift_B[:, None]) % T
    return jnp.take_along_axis(x_BT, source_BT.reshape(source_BT.shape + (1,) * (x_BT.ndim - 2)), axis=1)


class LightningMixer(nn.Module):
    num_heads: int
    head_dim: int
    decay_H: tuple  # static per-layer rates, a tuple so the module stays hashable
    implementation: str
    block_size: int
    dtype: jnp.dtype
    norm_eps: float = 1e-5
    out_init_scale: float = 1.0

    @nn.compact
    def __call__(self, x_BTD, num_new_B=None, cache: LinearState | None = None):
        """Without a cache: a causal pass from an empty state. With one: the tokens continue each row's state;
        only row b's first num_new_B[b] tokens count (right-padded prompts)."""
        D, N, H = x_BTD.shape[-1], self.num_heads, self.head_dim

        def kernel(name, shape, axes, in_axis, out_axis, scale=1.0):
            init = nn.with_logical_partitioning(dense_init(scale, in_axis, out_axis), axes)
            return self.param(name, init, shape, jnp.float32).astype(self.dtype)

        def project(name):
            return jnp.einsum("btd,dnh->btnh", x_BTD,
                              kernel(f"{name}_kernel", (D, N, H), ("embed", "heads", "kv"), 0, (1, 2)))

        q_BTNH, k_BTNH, v_BTNH = nn.silu(project("query")), nn.silu(project("key")), project("value")
        decay_N = jnp.asarray(self.decay_H, jnp.float32)

        if cache is None:
            o_BTNH, _ = lightning_attention(q_BTNH, k_BTNH, v_BTNH, decay_N, implementation=self.implementation,
                                            block_size=self.block_size)
        elif x_BTD.shape[1] == 1:
            o_BNH, state_BNHH = lightning_decode_step(q_BTNH[:, 0], k_BTNH[:, 0], v_BTNH[:, 0], decay_N,
                                                      cache.state_BHDE)
            o_BTNH, cache = o_BNH[:, None], LinearState(state_BNHH)
        else:
            o_BTNH, cache = self._continue(q_BTNH, k_BTNH, v_BTNH, decay_N, num_new_B, cache)

        T = x_BTD.shape[1]
        o_BTF = RMSNorm(self.norm_eps, self.dtype, "heads", name="attention_output_norm")(o_BTNH.reshape(-1, T, N * H))
        gate_BTF = nn.sigmoid(jnp.einsum("btd,dr,rf->btf", x_BTD,
                                         kernel("gate_down_kernel", (D, H), ("embed", "kv"), 0, 1),
                                         kernel("gate_up_kernel", (H, N * H), ("kv", "heads"), 0, 1)))
        out_BTD = jnp.einsum("btf,fd->btd", o_BTF * gate_BTF,
                             kernel("out_kernel", (N * H, D), ("heads", "embed"), 0, 1, self.out_init_scale))
        return out_BTD, cache

    def _continue(self, q_BTNH, k_BTNH, v_BTNH, decay_N, num_new_B, cache):
        """Several tokens after a state, rows of different lengths. Rows are left-aligned so every row's last
        token ends the pass: padding (with zero keys) then adds nothing and decays nothing that matters. The
        carried state's share, decay^(j+1) q_j S0, is added outside the kernel so the padding cannot decay it."""
        B, T = q_BTNH.shape[:2]
        num_new_B = jnp.full((B,), T, jnp.int32) if num_new_B is None else num_new_B
        shift_B = T - num_new_B
        valid_BT = jnp.arange(T)[None, :] >= shift_B[:, None]
        q_BTNH, v_BTNH = _left_align(q_BTNH, shift_B), _left_align(v_BTNH, shift_B)
        k_BTNH = jnp.where(valid_BT[..., None, None], _left_align(k_BTNH, shift_B), 0)
        o_BTNH, new_state_BNHH = lightning_attention(q_BTNH, k_BTNH, v_BTNH, decay_N,
                                                     implementation=self.implementation, block_size=self.block_size)
        steps_BT = jnp.maximum(jnp.arange(T)[None, :] - shift_B[:, None] + 1, 0)  # tokens since the state
        carried_BTNH = jnp.einsum("btnd,bnde->btne", q_BTNH.astype(jnp.float32), cache.state_BHDE)
        carried_BTNH = carried_BTNH * decay_N[None, None, :, None] ** steps_BT[..., None, None]
        o_BTNH = o_BTNH + carried_BTNH.astype(o_BTNH.dtype)
        decayed_BNHH = decay_N[None, :, None, None] ** num_new_B[:, None, None, None] * cache.state_BHDE
        new_state_BNHH = new_state_BNHH + decayed_BNHH
        return _left_align(o_BTNH, -shift_B), LinearState(new_state_BNHH)
