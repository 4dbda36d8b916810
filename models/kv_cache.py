"""The decode cache: an explicit pytree passed into the model and returned by it, never hidden module state."""

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


@flax.struct.dataclass
class LayerKV:
    """One attention layer's keys and values, [batch, kv_heads, cache_len, head_dim]."""

    k_BKSH: jax.Array
    v_BKSH: jax.Array

    def logical_axes(self) -> "LayerKV":
        axes = P("cache_batch", "cache_heads", "cache_len", "cache_kv")
        return LayerKV(axes, axes)


@flax.struct.dataclass
class Cache:
    """Every layer's cache plus how many positions of each sequence are filled (the next token's position)."""

    layers: tuple
    lengths_B: jax.Array

    @property
    def max_len(self) -> int | None:
        """Positions the key/value layers can hold; None when every layer carries a fixed-size state."""
        lengths = [layer.k_BKSH.shape[2] for layer in self.layers if isinstance(layer, LayerKV)]
        return min(lengths) if lengths else None

    def logical_axes(self) -> "Cache":
        return Cache(tuple(layer.logical_axes() for layer in self.layers), P("cache_batch"))


def write(cache_BKSH, new_BTKH, positions_BT):
    """Writes each sequence's new keys (or values) at its own positions; positions past the cache are dropped."""
    new_BKTH = jnp.swapaxes(new_BTKH, 1, 2).astype(cache_BKSH.dtype)
    return jax.vmap(lambda c_KSH, n_KTH, p_T: c_KSH.at[:, p_T].set(n_KTH, mode="drop"))(
        cache_BKSH, new_BKTH, positions_BT)
