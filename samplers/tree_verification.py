"""Which drafted tokens the target accepts: the exact rule of speculative sampling, for chains and token trees.

The target has scored every node of a TokenTree (models/token_tree.py) in one forward; node n's logits give the
distribution p of the token after it. From the root, level by level, the children x_1..x_b of the current node
are tested in order (SpecInfer's multi-candidate rule, as SpecExec and STree run it):

  accept x_c with probability min(1, p(x_c) / q_c(x_c));  on rejection  p <- norm(max(p - q_c, 0))

where q_c is the distribution x_c was drawn from (a draft model's, sampled without replacement: its q with the
earlier siblings removed; a deterministic drafter's point mass, so the test is p(x_c) and the rejection removes
x_c from p). The first accepted child becomes the current node; if none is, the next token is drawn from what is
left of p and the step ends; at a leaf the next token is the target's own (the bonus). Every emitted token is then
distributed as the target's, whatever the drafts. p and q are the processed distributions (temperature, top-k,
top-p, min-p, applied as plain sampling applies them). Greedy: accept the child equal to the target's argmax.

  path_BL, num_accepted_B, next_B = verify(rng, logits_BNV, tokens_BN, draft_probs_BNV, tree, sampling)

path_BL[b, :num_accepted_B[b] + 1] are the nodes kept (the root first); next_B is the token after them.
"""

import jax
import jax.numpy as jnp

from models.token_tree import TokenTree
from samplers import sampling as sampling_lib
from samplers.sampling import SamplingConfig


def children(tree: TokenTree, depth: int, node_B):
    """[B, b] the children of each row's node at `depth` (nodes of a level are numbered in order)."""
    b = tree.branching[depth]
    first_B = tree.level_starts[depth + 1] + (node_B - tree.level_starts[depth]) * b
    return first_B[:, None] + jnp.arange(b)[None]


def _at(x_BN, node_B):
    return jnp.take_along_axis(x_BN, node_B[:, None], axis=1)[:, 0]


def verify(rng, logits_BNV, tokens_BN, draft_probs_BNV, tree: TokenTree, sampling: SamplingConfig,
           skip_residual: bool = False):
    """The accepted path, its length in drafts, and the next token; draft_probs_BNV None for a deterministic
    drafter. skip_residual (a broken rule, for the negative control of the exactness test) samples a rejected
    level's replacement from p itself, as a verifier that forgets the residual would."""
    B = logits_BNV.shape[0]
    node_B = jnp.zeros((B,), jnp.int32)
    alive_B = jnp.ones((B,), bool)
    path = [node_B]
    if sampling.is_greedy:
        for d in range(tree.depth):
            target_B = jnp.argmax(_node_logits(logits_BNV, node_B), axis=-1)
            child_Bb = children(tree, d, node_B)
            match_Bb = jnp.take_along_axis(tokens_BN, child_Bb, axis=1) == target_B[:, None]
            found_B = alive_B & jnp.any(match_Bb, axis=1)
            node_B = jnp.where(found_B, _at(child_Bb, jnp.argmax(match_Bb, axis=1)), node_B)
            alive_B = found_B
            path.append(node_B)
        next_B = jnp.argmax(_node_logits(logits_BNV, node_B), axis=-1).astype(jnp.int32)
        return _finish(path, next_B)

    rows_B = jnp.arange(B)
    # Row b draws with keys from fold_in(rng, b), as plain sampling does: independent of the batch's sharding.
    row_keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows_B)

    def draw(tag, draw_one):
        return jax.vmap(lambda key, *args: draw_one(jax.random.fold_in(key, tag), *args))

    final_p_BV = jnp.zeros(logits_BNV.shape[::2], jnp.float32)  # the residual of rows that stopped
    for d in range(tree.depth):
        p_BV = _probs(_node_logits(logits_BNV, node_B), sampling)
        target_p_BV = p_BV
        child_Bb = children(tree, d, node_B)
        accepted_child_B = jnp.full((B,), -1)
        for c in range(tree.branching[d]):
            child_B = child_Bb[:, c]
            x_B = _at(tokens_BN, child_B)
            if draft_probs_BNV is None:
                q_BV = jax.nn.one_hot(x_B, p_BV.shape[-1], dtype=jnp.float32)
            else:
                q_BV = draft_probs_BNV[rows_B, child_B]
            q_x_B, p_x_B = q_BV[rows_B, x_B], p_BV[rows_B, x_B]
            u_B = draw(d * 1024 + c, jax.random.uniform)(row_keys_B)
            # A child its drafter could not have drawn (q 0: the distribution ran out of tokens) is skipped.
            trying_B = alive_B & (accepted_child_B < 0) & (q_x_B > 0)
            accept_B = trying_B & (u_B * q_x_B <= p_x_B)
            accepted_child_B = jnp.where(accept_B, child_B, accepted_child_B)
            reject_B = trying_B & ~accept_B
            residual_BV = jnp.maximum(p_BV - q_BV, 0)
            mass_B1 = residual_BV.sum(-1, keepdims=True)
            residual_BV = jnp.where(mass_B1 > 0, residual_BV / jnp.where(mass_B1 > 0, mass_B1, 1), p_BV)
            p_BV = jnp.where(reject_B[:, None], residual_BV, p_BV)
        found_B = accepted_child_B >= 0
        stops_B = alive_B & ~found_B
        final_p_BV = jnp.where(stops_B[:, None], target_p_BV if skip_residual else p_BV, final_p_BV)
        node_B = jnp.where(found_B, accepted_child_B, node_B)
        alive_B = alive_B & found_B
        path.append(node_B)
    final_p_BV = jnp.where(alive_B[:, None], _probs(_node_logits(logits_BNV, node_B), sampling), final_p_BV)
    next_B = draw(tree.depth * 1024, jax.random.categorical)(row_keys_B, jnp.log(final_p_BV))
    return _finish(path, next_B.astype(jnp.int32))


def _node_logits(logits_BNV, node_B):
    return jnp.take_along_axis(logits_BNV, node_B[:, None, None], axis=1)[:, 0]


def _probs(logits_BV, sampling: SamplingConfig):
    return jax.nn.softmax(sampling_lib.process_logits(logits_BV, sampling), axis=-1)


def _finish(path, next_B):
    """The path as [B, depth + 1] nodes; a row that stopped early repeats its last node, which num_accepted_B
    (the number of distinct steps down) cuts off."""
    path_BL = jnp.stack(path, axis=1).astype(jnp.int32)
    num_accepted_B = jnp.sum(path_BL[:, 1:] != path_BL[:, :-1], axis=1).astype(jnp.int32)
    return path_BL, num_accepted_B, next_B
