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
    """Writes each sequence's new keys (or values) at its own positions; positions past the cache are dropped.

    The write goes through the same [batch * kv_heads, S, H] view that attention reads the cache in. Written in
    the [B, K, S, H] shape, at batch 1 XLA:CPU fuses the update once into the reader's reshape and once into the
    carried cache, and copies the whole cache every decode step to keep both."""
    B, K, S, H = cache_BKSH.shape
    T = new_BTKH.shape[1]
    cache_ZSH = cache_BKSH.reshape(B * K, S, H)
    new_ZTH = jnp.swapaxes(new_BTKH, 1, 2).reshape(B * K, T, H).astype(cache_BKSH.dtype)
    positions_ZT = jnp.repeat(positions_BT, K, axis=0)
    cache_ZSH = jax.vmap(lambda c_SH, n_TH, p_T: c_SH.at[p_T].set(n_TH, mode="drop"))(cache_ZSH, new_ZTH, positions_ZT)
    return cache_ZSH.reshape(B, K, S, H)
