"""The normalization and feed-forward blocks of a Llama-style decoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def dense_init(scale: float = 1.0, in_axis=-2, out_axis=-1):
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 whatever the compute dtype."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(self.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    mlp_dim: int
    dtype: jnp.dtype
    out_init_scale: float = 1.0

    @nn.compact
    def __call__(self, x_BTD):
        def dense(features, axes, name, scale=1.0):
            return nn.DenseGeneral(features, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                                   kernel_init=nn.with_logical_partitioning(dense_init(scale), axes))

        gate_BTF = dense(self.mlp_dim, ("embed", "mlp"), "gate")(x_BTD)
        up_BTF = dense(self.mlp_dim, ("embed", "mlp"), "up")(x_BTD)
        hidden_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, ("act_batch", "act_len", "act_mlp"))
        return dense(x_BTD.shape[-1], ("mlp", "embed"), "down", self.out_init_scale)(hidden_BTF)
