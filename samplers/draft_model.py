"""A draft model for speculative decoding (samplers/speculative.py): any registered model that shares the target's
tokenizer, with its own cache in the strategy's state.

It drafts a tree level by level: one forward of the tokens it has not seen yet (the new root, and the last
accepted draft when the target accepted a whole path, since that leaf was never fed to it) gives the root's
children; each further level is one forward of the level's nodes as a token forest hanging below the root
(models/token_tree.py), whose logits give their children. Children are the draft's top candidates when greedy,
else drawn without replacement from its processed distribution q in drawing order (reordering them would break
exactness, STree's pitfall), each reported with q less its earlier siblings, renormalised. After verification the
draft cache keeps the accepted path (Cache.keep_path, or rollback for a chain).

  DraftModel(Model(draft_config), draft_params)
"""

import flax.struct
import jax
import jax.numpy as jnp

from errors import InputError
from models.cache import Cache
from models.token_tree import TokenTree
from samplers import sampling as sampling_lib
from samplers.sampling import SamplingConfig


@flax.struct.dataclass
class DraftModelState:
    cache: Cache  # every token before the root, and after propose the forest of drafts it wrote
    leaf_B: jax.Array  # an accepted leaf the draft has not seen (fed before the next root)
    has_leaf_B: jax.Array  # int32 0 or 1
    forest_start_B: jax.Array  # the cache length where this step's forest starts


class DraftModel:
    deterministic = False

    def __init__(self, model, params):
        self.model, self.params = model, params

    def rollback_window(self, tree: TokenTree) -> int:
        return tree.num_nodes + 1  # the forest (num_nodes - 1 at most) and the two unseen tokens

    def prepare(self, sampler, vocab_size: int):
        if self.model.config.vocab_size != vocab_size:
            raise InputError(f"DraftModel: the draft's vocab_size={self.model.config.vocab_size} is not the "
                             f"target's {vocab_size}; a draft model must share the target's tokenizer")
        return sampler.place_params(self.model, self.params)

    def _forward(self, params, tokens_BT, cache, num_new_B, **kwargs):
        return self.model.apply({"params": params}, tokens_BT, cache, num_new_B, **kwargs)

    def init(self, ctx, params, prefill, tree: TokenTree) -> DraftModelState:
        batch = prefill.prompt_BP.shape[0]
        cache = self.model.init_cache(batch, prefill.cache.capacity, self.rollback_window(tree))
        _, cache = self._forward(params, prefill.prompt_BP, cache, prefill.lengths_B)
        zeros_B = jnp.zeros((batch,), jnp.int32)
        return DraftModelState(cache, zeros_B, zeros_B, cache.lengths_B)

    def propose(self, ctx, params, state: DraftModelState, root_B, tree: TokenTree, sampling: SamplingConfig, rng):
        active_B = ctx.active_B.astype(jnp.int32)
        # The unseen tokens: [leaf, root] or [root, -].
        unseen_B2 = jnp.stack([jnp.where(state.has_leaf_B > 0, state.leaf_B, root_B), root_B], axis=1)
        logits_B1V, cache = self._forward(params, unseen_B2, state.cache, (1 + state.has_leaf_B) * active_B,
                                          logits_at_B=state.has_leaf_B)
        forest_start_B = cache.lengths_B
        forest_mask = tree.ancestor_mask[1:, 1:]
        level_logits_BPV = logits_B1V
        tokens, probs = [], []
        for d, b in enumerate(tree.branching):
            children_BPb, q_BPbV = _children(jax.random.fold_in(rng, d), level_logits_BPV, b, sampling)
            B, P = children_BPb.shape[:2]
            tokens.append(children_BPb.reshape(B, P * b))
            probs.append(q_BPbV.reshape(B, P * b, -1))
            if d + 1 < tree.depth:  # the leaves are not fed: nothing is drafted below them
                start, size = tree.level_starts[d + 1] - 1, tree.level_sizes[d + 1]
                level_logits_BPV, cache = self._forward(
                    params, tokens[-1], cache, size * active_B,
                    tree_mask_TN=None if tree.is_chain else forest_mask[start:start + size, :start + size])
        probs_BMV = None if sampling.is_greedy else jnp.concatenate(probs, axis=1)
        return state.replace(cache=cache, forest_start_B=forest_start_B), jnp.concatenate(tokens, axis=1), probs_BMV

    def commit(self, ctx, params, state: DraftModelState, tokens_BN, path_BL, num_accepted_B,
               tree: TokenTree) -> DraftModelState:
        # Forest nodes are the tree's less the root; an accepted leaf was never written.
        written_B = jnp.minimum(num_accepted_B, tree.depth - 1)
        if tree.is_chain:
            cache = state.cache.rollback(state.forest_start_B + written_B)
        else:
            cache = state.cache.keep_path(state.forest_start_B, jnp.maximum(path_BL[:, 1:] - 1, 0), written_B)
        has_leaf_B = (num_accepted_B == tree.depth).astype(jnp.int32)
        leaf_B = jnp.take_along_axis(tokens_BN, path_BL[:, -1:], axis=1)[:, 0]
        return state.replace(cache=cache, leaf_B=leaf_B, has_leaf_B=has_leaf_B)

    def has_room(self, state: DraftModelState, tree: TokenTree):
        return state.cache.has_room(tree.num_nodes + 1)


def _children(rng, logits_BPV, b: int, sampling: SamplingConfig):
    """[B, P, b] children of each node and [B, P, b, V] the distribution each was drawn from."""
    B, P, V = logits_BPV.shape
    logits_BPV = sampling_lib.process_logits(logits_BPV.reshape(B * P, V), sampling).reshape(B, P, V)
    if sampling.is_greedy:
        return jax.lax.top_k(logits_BPV, b)[1].astype(jnp.int32), jnp.zeros((B, P, b, 0))
    q_BPV = jax.nn.softmax(logits_BPV, axis=-1)
    # Gumbel top-b draws b tokens without replacement, in drawing order; row b uses fold_in(rng, b).
    row_keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(B))
    gumbel_BPV = jax.vmap(lambda key: jax.random.gumbel(key, (P, V)))(row_keys_B)
    children_BPb = jax.lax.top_k(jnp.log(q_BPV) + gumbel_BPV, b)[1].astype(jnp.int32)
    # Sibling c was drawn from q without siblings 0..c-1.
    drawn_BPbV = jax.nn.one_hot(children_BPb, V, dtype=jnp.float32)
    earlier_BPbV = jnp.cumsum(drawn_BPbV, axis=2) - drawn_BPbV
    q_BPbV = jnp.where(earlier_BPbV > 0, 0.0, q_BPV[:, :, None])
    q_BPbV = q_BPbV / jnp.maximum(q_BPbV.sum(-1, keepdims=True), 1e-30)
    return children_BPb, q_BPbV
