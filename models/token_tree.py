"""Token trees: several continuations scored in one forward, each token seeing only the prefix and its ancestors.

A tree is flat, in topological order (a parent before its children), and described by its ancestor mask
M[i, j] = (j is i or an ancestor of i). A forward either writes a whole tree (T = N tokens) or the last T nodes of
one whose first N - T nodes the calls just before wrote (a tree drafted level by level); either way it passes the
new nodes' rows, `tree_mask_TN = M[N - T:]`. Several roots make a forest: a draft model's tree hangs below a token
it already consumed. Node i of a tree written after `tree_start` tokens sits at cache slot tree_start + i and at
position tree_start + depth(i) (depth = M[i].sum() - 1), so once an accepted path is moved to contiguous slots
(Cache.keep_path) its keys already carry their final rotary phases. A chain is the tree of a lower-triangular mask.

`TokenTree` is the static shape a decoding strategy drafts into: `branching[d]` children under every node of
depth d, filled level by level (breadth-first), so the children of a node are contiguous.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


def depths(tree_mask_TN) -> np.ndarray:
    """[T] depth of each new node below its tree's (or forest's) roots."""
    return np.asarray(tree_mask_TN).sum(axis=1) - 1


def write_slots(positions_BT, tree_mask_TN):
    """[B, T] the cache slots of the new nodes, from their positions (the first node's position less its depth is
    the slot where the tree starts)."""
    T, N = tree_mask_TN.shape
    tree_start_B1 = positions_BT[:, :1] - int(depths(tree_mask_TN)[0])
    return tree_start_B1 + (N - T) + jnp.arange(T)[None]


def visible(tree_mask_TN, slots_BT, cache_len: int):
    """[B, T, S] whether new node t sees cache slot s: every slot before the tree, and in it its ancestors."""
    T, N = tree_mask_TN.shape
    tree_start_B11 = slots_BT[:, :1, None] - (N - T)
    node_B1S = jnp.arange(cache_len)[None, None] - tree_start_B11
    in_tree_BTS = jnp.asarray(tree_mask_TN)[jnp.arange(T)[None, :, None], jnp.clip(node_B1S, 0, N - 1)]
    return (node_B1S < 0) | ((node_B1S < N) & in_tree_BTS)


@dataclasses.dataclass(frozen=True)
class TokenTree:
    """A static tree of drafts below a root: branching[d] children under every node of depth d (a chain of γ
    drafts is branching (1,) * γ). Node 0 is the root; nodes are numbered level by level."""

    branching: tuple[int, ...]

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Nodes per depth, the root's level first."""
        return tuple(math.prod(self.branching[:d]) for d in range(len(self.branching) + 1))

    @property
    def level_starts(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.cumsum((0,) + self.level_sizes[:-1]))

    @property
    def num_nodes(self) -> int:
        return sum(self.level_sizes)

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def is_chain(self) -> bool:
        return all(b == 1 for b in self.branching)

    @property
    def parents(self) -> np.ndarray:
        """[num_nodes] each node's parent (-1 for the root)."""
        parents = [-1]
        for d, children in enumerate(self.branching):
            start = self.level_starts[d]
            parents += [start + i // children for i in range(self.level_sizes[d + 1])]
        return np.array(parents)

    @property
    def ancestor_mask(self) -> np.ndarray:
        """[num_nodes, num_nodes] M[i, j] = j is i or one of its ancestors."""
        mask = np.eye(self.num_nodes, dtype=bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                mask[i] |= mask[parent]
        return mask
