"""The decode cache: every token mixer owns its layer cache; a model's cache is their tuple plus per-row lengths.

A layer cache is a flax.struct pytree that its layer creates (the mixer's `init_cache`), writes and reads inside its
own `__call__`, and that answers these for everyone else:

  logical_axes()            the same tree with a PartitionSpec of logical names for each array (sharding)
  capacity                  the positions it can hold, or None for a fixed-size state that never fills
  rollback(num_dropped_B)   the cache as if row b's last num_dropped_B[b] written tokens had never been written
  keep_path(start_B, num_written_B, path_BL, path_len_B)
                            after a token tree (models/token_tree.py) was written from slot start_B (its last
                            num_written_B tokens), the cache as if only the nodes path_BL[b, :path_len_B[b]] (a
                            path from a root, in order) had been written

Nothing outside a layer reads its cache's fields: the engine and the decoding strategies see only `Cache`.
A new cache type (a compressed KV cache, a state-space state) is one class with these three members, created by
its layer's `init_cache`.
"""

from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


class LayerCache(Protocol):
    def logical_axes(self) -> "LayerCache": ...

    @property
    def capacity(self) -> int | None: ...

    def rollback(self, num_dropped_B: jax.Array) -> "LayerCache": ...

    def keep_path(self, start_B, num_written_B, path_BL, path_len_B) -> "LayerCache": ...


@flax.struct.dataclass
class Cache:
    """Every layer's cache and how many positions of each row are filled (the position of its next token)."""

    layers: tuple
    lengths_B: jax.Array

    @property
    def capacity(self) -> int | None:
        """Positions every layer can hold; None when every layer carries a fixed-size state."""
        capacities = [layer.capacity for layer in self.layers if layer.capacity is not None]
        return min(capacities) if capacities else None

    def has_room(self, num_tokens: int) -> jax.Array:
        """[B] whether each row can take `num_tokens` more tokens."""
        if self.capacity is None:
            return jnp.ones(self.lengths_B.shape, bool)
        return self.lengths_B + num_tokens <= self.capacity

    def advance(self, layers: tuple, num_new_B: jax.Array) -> "Cache":
        """The cache after the layers wrote num_new_B[b] more tokens of row b."""
        return Cache(tuple(layers), self.lengths_B + num_new_B)

    def rollback(self, lengths_B: jax.Array) -> "Cache":
        """The cache cut back to `lengths_B` (each at most the current length, and within every layer's rollback
        window: see the layer caches); continuing from it equals never having written the dropped tokens."""
        num_dropped_B = self.lengths_B - lengths_B
        return Cache(tuple(layer.rollback(num_dropped_B) for layer in self.layers), lengths_B)

    def keep_path(self, start_B: jax.Array, path_BL: jax.Array, path_len_B: jax.Array) -> "Cache":
        """After a token tree was written from length start_B, the cache holding only the path
        path_BL[b, :path_len_B[b]] of it (node indices of the tree, a root first), as if only it had been written.
        The tree must lie within every layer's rollback window."""
        num_written_B = self.lengths_B - start_B
        return Cache(tuple(layer.keep_path(start_B, num_written_B, path_BL, path_len_B) for layer in self.layers),
                     start_B + path_len_B)

    def logical_axes(self) -> "Cache":
        return Cache(tuple(layer.logical_axes() for layer in self.layers), P("cache_batch"))
