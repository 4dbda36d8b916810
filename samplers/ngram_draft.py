"""N-gram drafts for speculative decoding (samplers/speculative.py), no second model: prompt lookup in the running
context (prompt and generated tokens), then the n-gram store (samplers/ngram_store.py).

Each node's children are the distinct tokens that followed earlier occurrences of the node's last n tokens (its
context: the history, then its path in the tree), longest n first (max_n down to min_n), then the most recent;
missing ones come from the store's most frequent continuations of the node's longest seen context; what is
still missing repeats the first candidate (a wasted draft, never a wrong token). The drafts are deterministic:
the verifier treats each as a point mass (accept with probability p(x), and on rejection remove x from p), which
keeps speculative sampling exact at any temperature.

  NgramDraft(NgramDraftConfig(max_n=4), store=ngram_store.load_ngram_store(path))
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from errors import InputError, checks
from models.token_tree import TokenTree
from samplers import ngram_store
from samplers.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class NgramDraftConfig:
    max_n: int = 4  # the longest context suffix looked up in the history
    min_n: int = 1

    def __post_init__(self):
        checks.integer("NgramDraftConfig.min_n", self.min_n, minimum=1)
        checks.integer("NgramDraftConfig.max_n", self.max_n, minimum=self.min_n)


@flax.struct.dataclass
class NgramDraftState:
    prompt_BP: jax.Array
    prompt_len_B: jax.Array


class NgramDraft:
    deterministic = True

    def __init__(self, config: NgramDraftConfig = NgramDraftConfig(), store=None):
        self.config, self.store = config, store

    def prepare(self, sampler, vocab_size: int):
        if self.store is not None and self.store.vocab_size != vocab_size:
            raise InputError(f"NgramDraft: the n-gram store's vocab_size={self.store.vocab_size} is not the "
                             f"model's {vocab_size}; build it with the model's tokenizer")
        return None if self.store is None else sampler.place_replicated(self.store)

    def init(self, ctx, store, prefill, tree: TokenTree) -> NgramDraftState:
        return NgramDraftState(prefill.prompt_BP, prefill.lengths_B)

    def propose(self, ctx, store, state: NgramDraftState, root_B, tree: TokenTree, sampling: SamplingConfig, rng):
        del root_B, sampling, rng  # the root is the history's last token; drafts are deterministic
        history_BH, length_B = self._history(ctx, state)
        B = history_BH.shape[0]
        # Every node's context: the history, then its path below the root (at most tree.depth - 1 tokens).
        context_BPX = jnp.concatenate([history_BH[:, None], jnp.zeros((B, 1, tree.depth), jnp.int32)], axis=2)
        context_len_BP = length_B[:, None]
        tokens = []
        for d, b in enumerate(tree.branching):
            children_BPb = self._children(store, context_BPX, context_len_BP, b)
            P = children_BPb.shape[1]
            tokens.append(children_BPb.reshape(B, P * b))
            # The children's contexts: each parent's, with the child appended.
            context_BPX = jnp.repeat(context_BPX, b, axis=1)
            context_len_BP = jnp.repeat(context_len_BP, b, axis=1)
            context_BPX = jax.vmap(jax.vmap(lambda c_X, i, t: c_X.at[i].set(t)))(context_BPX, context_len_BP,
                                                                              tokens[-1])
            context_len_BP = context_len_BP + 1
        return state, jnp.concatenate(tokens, axis=1), None

    def _history(self, ctx, state: NgramDraftState):
        """[B, P + N] prompt then emitted tokens, left-aligned, and each row's length."""
        P = state.prompt_BP.shape[1]
        N = ctx.tokens_BN.shape[1]
        h_H = jnp.arange(P + N)[None]
        from_tokens_BH = jnp.take_along_axis(ctx.tokens_BN, jnp.clip(h_H - state.prompt_len_B[:, None], 0, N - 1), 1)
        prompt_BH = jnp.pad(state.prompt_BP, ((0, 0), (0, N)))
        history_BH = jnp.where(h_H < state.prompt_len_B[:, None], prompt_BH, from_tokens_BH)
        return history_BH, state.prompt_len_B + ctx.num_tokens_B

    def _children(self, store, context_BPX, length_BP, b: int):
        """[B, P, b] distinct draft tokens after each context."""
        lookup_BPb, found_BPb = self._lookup(context_BPX, length_BP, b)
        candidates_BPM, valid_BPM = lookup_BPb, found_BPb
        if store is not None:
            stored_BPb, counts_BPb = ngram_store.top_continuations(store, context_BPX, length_BP, b)
            candidates_BPM = jnp.concatenate([lookup_BPb, stored_BPb], axis=-1)
            valid_BPM = jnp.concatenate([found_BPb, counts_BPb > 0], axis=-1)
        # The first b distinct valid candidates, in order.
        chosen = []
        for _ in range(b):
            first_BP = jnp.argmax(valid_BPM, axis=-1)
            token_BP = jnp.take_along_axis(candidates_BPM, first_BP[..., None], -1)[..., 0]
            any_BP = jnp.any(valid_BPM, axis=-1)
            chosen.append(jnp.where(any_BP, token_BP, -1))
            valid_BPM = valid_BPM & (candidates_BPM != token_BP[..., None])
        chosen_BPb = jnp.stack(chosen, axis=-1)
        fallback_BP1 = jnp.where(chosen_BPb[..., :1] >= 0, chosen_BPb[..., :1], 0)
        return jnp.where(chosen_BPb >= 0, chosen_BPb, fallback_BP1).astype(jnp.int32)

    def _lookup(self, context_BPX, length_BP, b: int):
        """Up to b distinct tokens that followed the context's last n tokens earlier in it, ranked by n, then by
        recency; and which of them were found."""
        B, P, X = context_BPX.shape
        j_X = jnp.arange(X)
        padded_BPY = jnp.pad(context_BPX, ((0, 0), (0, 0), (self.config.max_n, 0)), constant_values=-1)
        best_BPX = jnp.zeros((B, P, X), jnp.int32)  # the longest n whose occurrence ends at j
        for n in range(self.config.min_n, self.config.max_n + 1):
            match_BPX = (j_X[None, None] >= n - 1) & (j_X[None, None] <= length_BP[..., None] - 2)
            for i in range(n):
                suffix_BP = jnp.take_along_axis(context_BPX, jnp.maximum(length_BP - n + i, 0)[..., None], -1)
                shift = self.config.max_n - n + 1 + i  # padded index of j - n + 1 + i
                match_BPX &= padded_BPY[:, :, shift:shift + X] == suffix_BP
            match_BPX &= length_BP[..., None] >= n
            best_BPX = jnp.where(match_BPX, n, best_BPX)
        score_BPX = jnp.where(best_BPX > 0, best_BPX * X + j_X[None, None], -1)
        next_BPX = jnp.concatenate([context_BPX[..., 1:], jnp.full((B, P, 1), -1, jnp.int32)], axis=-1)
        tokens, found = [], []
        for _ in range(b):
            j_BP = jnp.argmax(score_BPX, axis=-1)
            found_BP = jnp.take_along_axis(score_BPX, j_BP[..., None], -1)[..., 0] >= 0
            token_BP = jnp.take_along_axis(next_BPX, j_BP[..., None], -1)[..., 0]
            tokens.append(token_BP)
            found.append(found_BP)
            score_BPX = jnp.where(next_BPX == token_BP[..., None], -1, score_BPX)
        return jnp.stack(tokens, -1), jnp.stack(found, -1)

    def commit(self, ctx, store, state, tokens_BN, path_BL, num_accepted_B, tree: TokenTree):
        return state  # the history is the engine's

    def has_room(self, state, tree: TokenTree):
        return jnp.ones(state.prompt_len_B.shape, bool)
