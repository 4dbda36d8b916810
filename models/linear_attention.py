"""TransNormerLLM-style token mixer on Lightning Attention-2: a constant-size state instead of a growing cache.

  q, k = silu(W_q x), silu(W_k x);  v = W_v x
  o    = RMSNorm(lightning_attention(q, k, v, decay))  * sigmoid(W_up W_down x)      (output gate, low rank)
  out  = W_o o

Per-head decay rates are ALiBi slopes s_h, made gentler with depth (TNL): decay_h = exp(-s_h (1 - l/(L-1))), so
the first layer forgets fastest and the last barely at all.
"""

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from models.layers import RMSNorm, dense_init
from models.linear_state import LinearState, pallas_sharding
from pallas_kernels.lightning_attention import lightning_attention


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


class LightningMixer(nn.Module):
    num_heads: int
    head_dim: int
    decay_H: tuple  # static per-layer rates, a tuple so the module stays hashable
    implementation: str  # the sequence kernel: pallas_kernels.lightning_attention.IMPLEMENTATIONS
    decode_implementation: str  # the one-token step: pallas_kernels.lightning_attention.DECODE_IMPLEMENTATIONS
    block_size: int
    dtype: jnp.dtype
    norm_eps: float = 1e-5
    out_init_scale: float = 1.0

    def init_cache(self, batch_size: int, cache_len: int, rollback_window: int = 0) -> LinearState:
        del cache_len  # the state has the same size however long the sequence
        return LinearState.init(batch_size, self.num_heads, self.head_dim, self.head_dim, self.decay_H, self.dtype,
                                rollback_window)

    @nn.compact
    def __call__(self, x_BTD, positions_BT=None, num_new_B=None, cache: LinearState | None = None,
                 tree_mask_TN=None):
        """Without a cache: a causal pass from an empty state. With one: the tokens continue each row's state;
        only row b's first num_new_B[b] tokens count (right-padded prompts), or they are the nodes of a token
        tree (tree_mask_TN, models/token_tree.py). Positions play no part: the decays order the tokens."""
        D, N, H = x_BTD.shape[-1], self.num_heads, self.head_dim

        def kernel(name, shape, axes, in_axis, out_axis, scale=1.0):
            init = nn.with_logical_partitioning(dense_init(scale, in_axis, out_axis), axes)
            return self.param(name, init, shape, jnp.float32).astype(self.dtype)

        def project(name):
            return jnp.einsum("btd,dnh->btnh", x_BTD,
                              kernel(f"{name}_kernel", (D, N, H), ("embed", "heads", "kv"), 0, (1, 2)))

        q_BTNH, k_BTNH, v_BTNH = nn.silu(project("query")), nn.silu(project("key")), project("value")

        if cache is None:
            o_BTNH, _ = lightning_attention(q_BTNH, k_BTNH, v_BTNH, jnp.asarray(self.decay_H, jnp.float32),
                                            implementation=self.implementation, block_size=self.block_size,
                                            sharding=pallas_sharding(self.implementation, "act_batch", "act_heads",
                                                                     (q_BTNH.shape[0], q_BTNH.shape[2])))
        else:
            o_BTNH, cache = cache.update(q_BTNH, k_BTNH, v_BTNH, num_new_B, implementation=self.implementation,
                                         decode_implementation=self.decode_implementation,
                                         block_size=self.block_size, tree_mask_TN=tree_mask_TN)

        T = x_BTD.shape[1]
        o_BTF = RMSNorm(self.norm_eps, self.dtype, "heads", name="attention_output_norm")(o_BTNH.reshape(-1, T, N * H))
        gate_BTF = nn.sigmoid(jnp.einsum("btd,dr,rf->btf", x_BTD,
                                         kernel("gate_down_kernel", (D, H), ("embed", "kv"), 0, 1),
                                         kernel("gate_up_kernel", (H, N * H), ("kv", "heads"), 0, 1)))
        out_BTD = jnp.einsum("btf,fd->btd", o_BTF * gate_BTF,
                             kernel("out_kernel", (N * H, D), ("heads", "embed"), 0, 1, self.out_init_scale))
        return out_BTD, cache
