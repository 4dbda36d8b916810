"""MAR's per-token diffusion head, SimpleMLPAdaLN (LTH14/mar models/diffloss.py; research notes section 3.1), in Flax:
an MLP on one noisy token, modulated by its timestep and by the backbone's hidden state (the condition).

  y = TimestepEmbedder(t) + Linear(condition)
  x = Linear(x_t)
  ResBlock, num_blocks times:  shift, scale, gate = Linear(SiLU(y));  x += gate * MLP(LN(x) (1 + scale) + shift)
  FinalLayer:                  shift, scale = Linear(SiLU(y));        out = Linear(LN(x) (1 + scale) + shift)

As in MAR, every adaLN modulation and the output layer start at zero (so a fresh head outputs 0 and each block
starts as the identity), the other Linears are Xavier-uniform and the timestep MLP normal(0.02). The output is one
prediction of width token_dim (eps or v, models/diffusion.py): MAR's second half, the learned variance, is dropped.
Parameters carry logical names: "embed" where the backbone's width meets the head, "head_mlp" for the head's width
and "token" for the token's; the default rules table (parallel/mesh.py) maps neither of the last two, so the head,
small beside the backbone, is replicated unless a config's rules shard it.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

FREQUENCY_DIM = 256  # MAR's TimestepEmbedder.frequency_embedding_size
MAX_PERIOD = 10_000


def timestep_features(t_N, dim: int = FREQUENCY_DIM):
    """[cos(t f), sin(t f)] with f geometric from 1 to 1 / MAX_PERIOD (MAR's timestep_embedding), float32 [N, dim]."""
    half = dim // 2
    frequencies_F = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
    args_NF = t_N.astype(jnp.float32)[:, None] * frequencies_F[None]
    return jnp.concatenate([jnp.cos(args_NF), jnp.sin(args_NF)], axis=-1)


class _Dense(nn.Module):
    features: int
    axes: tuple[str, str]
    initializer: str  # "xavier", "normal" (std 0.02) or "zeros"
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        kernel_init = {"xavier": nn.initializers.xavier_uniform(), "normal": nn.initializers.normal(0.02),
                       "zeros": nn.initializers.zeros}[self.initializer]
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=nn.with_logical_partitioning(kernel_init, self.axes),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]))(x)


def _layer_norm(width_axis: str, affine: bool, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, use_scale=affine, use_bias=affine, dtype=dtype, param_dtype=jnp.float32,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (width_axis,)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (width_axis,)), name=name)


def modulate(x_NW, shift_NW, scale_NW):
    return x_NW * (1 + scale_NW) + shift_NW


class ResBlock(nn.Module):
    width: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_NW, y_NW):
        shift_NW, scale_NW, gate_NW = jnp.split(
            _Dense(3 * self.width, ("head_mlp", "head_mlp_3"), "zeros", self.dtype, name="modulation")(nn.silu(y_NW)),
            3, axis=-1)
        h_NW = modulate(_layer_norm("head_mlp", True, self.dtype, "norm")(x_NW), shift_NW, scale_NW)
        h_NW = _Dense(self.width, ("head_mlp", "head_mlp_out"), "xavier", self.dtype, name="mlp_in")(h_NW)
        h_NW = _Dense(self.width, ("head_mlp_out", "head_mlp"), "xavier", self.dtype, name="mlp_out")(nn.silu(h_NW))
        return x_NW + gate_NW * h_NW


class DiffusionHead(nn.Module):
    """head(x_t_NC, t_N, condition_ND) -> prediction [N, token_dim] (float32)."""

    token_dim: int
    width: int
    num_blocks: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t_NC, t_N, condition_ND):
        dense = lambda features, axes, initializer, name: _Dense(features, axes, initializer, self.dtype, name=name)
        time_NW = dense(self.width, ("head_frequency", "head_mlp"), "normal", "time_in")(timestep_features(t_N))
        time_NW = dense(self.width, ("head_mlp_out", "head_mlp"), "normal", "time_out")(nn.silu(time_NW))
        y_NW = time_NW + dense(self.width, ("embed", "head_mlp"), "xavier", "condition")(condition_ND)
        x_NW = dense(self.width, ("token", "head_mlp"), "xavier", "input")(x_t_NC)
        for i in range(self.num_blocks):
            x_NW = ResBlock(self.width, self.dtype, name=f"block_{i}")(x_NW, y_NW)
        shift_NW, scale_NW = jnp.split(dense(2 * self.width, ("head_mlp", "head_mlp_2"), "zeros", "final_modulation")(
            nn.silu(y_NW)), 2, axis=-1)
        x_NW = modulate(_layer_norm("head_mlp", False, self.dtype, "final_norm")(x_NW), shift_NW, scale_NW)
        return dense(self.token_dim, ("head_mlp", "token"), "zeros", "output")(x_NW).astype(jnp.float32)
