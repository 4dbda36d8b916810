"""Speculative decoding, exact: a drafter proposes a chain or a token tree, the target scores all of it in one
forward over its cache, and the rule of samplers/tree_verification.py keeps what the target's own distribution
would have produced, plus one token of the target's. Rows accept different numbers of drafts; the target's cache
(and the drafter's) keep each row's accepted path only.

  sampler = Sampler(model, params, tokenizer, SamplerConfig(max_new_tokens=128),
                    strategy=Speculative(SpeculativeConfig.chain(4, SamplingConfig(temperature=0.8)),
                                         DraftModel(draft_model, draft_params)))
  Speculative(SpeculativeConfig(branching=(3, 2, 1, 1)), NgramDraft(NgramDraftConfig(), store))   # a tree

The target's step: [root = the newest token, not yet in its cache] + the drafts, one forward (a chain as plain
tokens; a tree through models/token_tree.py's mask, on softmax, linear-attention and hybrid layers alike), then
Cache.rollback (chain) or Cache.keep_path (tree) to the accepted path. A drafter is any object with

  deterministic                   True if it proposes tokens without a distribution (q is a point mass)
  prepare(sampler, vocab_size)    arrays to place once (a draft model's parameters, an n-gram store)
  init(ctx, constants, prefill, tree)
                                  its state after the prompt
  propose(ctx, constants, state, root_B, tree, sampling, rng) -> (state, tokens_BM, probs_BMV or None)
                                  the tree's nodes 1.. (level by level) and, unless deterministic, the
                                  distribution each was drawn from
  commit(ctx, constants, state, tokens_BN, path_BL, num_accepted_B, tree) -> state
                                  the state after the target kept path_BL[:, :num_accepted_B + 1]
  has_room(state, tree)           [B] whether it can draft another tree

(samplers/draft_model.py: a smaller model with the target's tokenizer; samplers/ngram_draft.py: prompt lookup in
the running context and the n-gram store.) Metrics for benchmarks: SpeculativeState.forwards_B (target forwards
per row) and drafted_B / accepted_B.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from errors import InputError, checks
from models.cache import Cache
from models.token_tree import TokenTree
from samplers import sampling, tree_verification
from samplers.sampling import SamplingConfig
from samplers.strategy import Context, Emitted, Prefill, Strategy


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """branching[d]: drafts under every node of depth d, so (1,) * γ is a chain of γ drafts and (3, 2, 1) a tree
    of 3 + 6 + 6 nodes. Sampling rules apply to the target and the draft alike; the repetition penalty, which
    depends on each node's own history, is not supported."""

    branching: tuple[int, ...] = (1, 1, 1, 1)
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self):
        object.__setattr__(self, "branching", tuple(self.branching))
        if not self.branching:
            raise InputError("SpeculativeConfig.branching=() drafts nothing: give at least one depth (γ >= 1)")
        for b in self.branching:
            checks.integer("SpeculativeConfig.branching entries", b, minimum=1)
        if self.sampling.repetition_penalty != 1:
            raise InputError(f"SpeculativeConfig.sampling.repetition_penalty={self.sampling.repetition_penalty}: "
                             "speculative decoding supports temperature, top_k, top_p and min_p (penalty 1)")

    @classmethod
    def chain(cls, gamma: int, sampling: SamplingConfig = SamplingConfig()) -> "SpeculativeConfig":
        checks.integer("SpeculativeConfig gamma (drafts per step)", gamma, minimum=1)
        return cls((1,) * gamma, sampling)

    @property
    def tree(self) -> TokenTree:
        return TokenTree(self.branching)


@flax.struct.dataclass
class SpeculativeState:
    cache: Cache  # the target's: every token but the root
    root_B: jax.Array  # the newest token, which the next step's forward writes first
    draft: object  # the drafter's state
    rng: jax.Array
    forwards_B: jax.Array  # target forwards per row, the prefill's included
    drafted_B: jax.Array  # drafts proposed, counted along the deepest path (the tree's depth per step)
    accepted_B: jax.Array


class Speculative(Strategy):
    def __init__(self, config: SpeculativeConfig, drafter, *, skip_residual: bool = False):
        """skip_residual: a broken verifier for the exactness test's negative control (tree_verification.py)."""
        self.config, self.drafter, self.tree = config, drafter, config.tree
        self.skip_residual = skip_residual
        self.tokens_per_step = self.tree.depth + 1
        self.cache_window = self.tree.num_nodes
        self.rollback_window = self.tree.num_nodes

    def prepare(self, sampler):
        vocab_size, capacity = sampler.model.config.vocab_size, sampler.config.cache_len
        if capacity and self.tree.num_nodes > capacity:
            raise InputError(f"SpeculativeConfig.branching={self.config.branching}: a tree of "
                             f"{self.tree.num_nodes} tokens does not fit SamplerConfig.cache_len={capacity}")
        return self.drafter.prepare(sampler, vocab_size)

    def init(self, ctx: Context, prefill: Prefill):
        rng, first_rng = jax.random.split(prefill.rng)
        root_B = sampling.sample(first_rng, prefill.logits_BV, self.config.sampling)
        draft = self.drafter.init(ctx, ctx.constants, prefill, self.tree)
        ones_B = jnp.ones_like(root_B)
        state = SpeculativeState(prefill.cache, root_B, draft, rng, ones_B, 0 * ones_B, 0 * ones_B)
        return state, Emitted(root_B[:, None], sampling.log_probs(prefill.logits_BV, root_B)[:, None], ones_B)

    def step(self, ctx: Context, state: SpeculativeState):
        active_B = ctx.active_B.astype(jnp.int32)
        rng = jax.random.fold_in(state.rng, ctx.step)
        draft_rng, verify_rng = jax.random.split(rng)
        draft, drafts_BM, draft_probs_BMV = self.drafter.propose(ctx, ctx.constants, state.draft, state.root_B,
                                                                 self.tree, self.config.sampling, draft_rng)
        tokens_BN = jnp.concatenate([state.root_B[:, None], drafts_BM], axis=1)
        N = self.tree.num_nodes
        tree_mask_TN = None if self.tree.is_chain else self.tree.ancestor_mask
        logits_BNV, cache = ctx.forward(tokens_BN, state.cache, N * active_B, tree_mask_TN=tree_mask_TN)
        draft_probs_BNV = None
        if draft_probs_BMV is not None:  # node 0, the root, was not drafted
            draft_probs_BNV = jnp.concatenate([jnp.zeros_like(draft_probs_BMV[:, :1]), draft_probs_BMV], axis=1)
        path_BL, num_accepted_B, next_B = tree_verification.verify(
            verify_rng, logits_BNV, tokens_BN, draft_probs_BNV, self.tree, self.config.sampling,
            self.skip_residual)

        kept_B = (num_accepted_B + 1) * active_B  # the root and the accepted drafts
        if self.tree.is_chain:
            cache = cache.rollback(state.cache.lengths_B + kept_B)
        else:
            cache = cache.keep_path(state.cache.lengths_B, path_BL, kept_B)
        draft = self.drafter.commit(ctx, ctx.constants, draft, tokens_BN, path_BL, num_accepted_B * active_B,
                                     self.tree)

        # Emitted: the accepted drafts along the path, then the next token; log-probs from each one's parent.
        L = path_BL.shape[1]
        emitted_nodes_BL = jnp.concatenate([path_BL[:, 1:], path_BL[:, -1:]], axis=1)
        c_L = jnp.arange(L)[None]
        tokens_BL = jnp.where(c_L < num_accepted_B[:, None], jnp.take_along_axis(tokens_BN, emitted_nodes_BL, 1),
                              next_B[:, None])
        parent_logits_BLV = jnp.take_along_axis(logits_BNV, path_BL[:, :, None], axis=1)
        log_probs_BL = jnp.take_along_axis(jax.nn.log_softmax(parent_logits_BLV, axis=-1), tokens_BL[..., None],
                                           axis=-1)[..., 0]
        emitted = Emitted(tokens_BL, log_probs_BL, num_accepted_B + 1)
        return SpeculativeState(
            cache=cache, root_B=jnp.where(ctx.active_B, next_B, state.root_B), draft=draft, rng=state.rng,
            forwards_B=state.forwards_B + active_B, drafted_B=state.drafted_B + self.tree.depth * active_B,
            accepted_B=state.accepted_B + num_accepted_B * active_B), emitted

    def is_done(self, ctx: Context, state: SpeculativeState) -> jax.Array:
        return ~state.cache.has_room(self.cache_window) | ~self.drafter.has_room(state.draft, self.tree)
