"""Jacobi decoding (Santilli et al., 2023; CLLMs, Kou et al., 2024, hao-ai-lab/Consistency_LLM): greedy decoding,
exactly, that guesses a window of future tokens and checks them all in one forward of the target.

Greedy output is the fixed point of y_i = argmax p(y | x, y_<i) for all i at once. Each step feeds the newest
committed token (not yet in the cache) and the window's n guesses g_1..g_n, continuing the cache, and takes the
argmax at every position: a_i = argmax p(. | x, committed, g_1..g_i). a_0 is always right; guess g_i is verified
when g_1..g_i equal a_0..a_{i-1} (its context is then committed text), and so is a_i. A step commits the k
verified guesses and a_k (k + 1 >= 1 tokens, k per row), rolls each row's cache back past the n - k unverified
positions (Cache.rollback) and carries the rest of the new guesses, a_{k+1}..a_n, as the next window (CLLM's
fast-forwarding: beyond the first wrong guess they are the model's best guesses yet), topped up at the end with
copies of a_n. A window of n uses n + 1 cache positions per step, and rows near a full cache check fewer guesses
(only the written ones), so every row's tokens and cache are greedy decoding's, up to the last position.

The window starts as n copies of the first generated token, and the top-up repeats the newest guess, rather than
padding: the guesses are the context of every later position in the window, so they should be text the model
could have written (padding is id 0, a special token in most vocabularies, e.g. SmolLM2's <|endoftext|>), and
repetition, the commonest greedy continuation of small models, is then right from the first step. CLLM draws the
guesses from the prompt's tokens at random; any choice gives the same tokens, only the step count differs.

A step stops committing at a stop token and at the token budget (the engine cuts the chunk there anyway), so the
cache and the counts end where greedy decoding's do. The counts CLLM reports are kept per row in the state:
  iterations      steps (forwards of the target) the row ran, the prefill not included
  committed       tokens those steps committed (tokens per iteration = committed / iterations; 1 for greedy)
  fast_forwarded  committed guesses: tokens beyond the one any greedy step makes, predicted right behind a wrong
                  guess of an earlier step (CLLM's fast-forwarding; 0 for greedy)
  stationary      the fast-forwarded tokens that had already stood unchanged through a step behind a wrong guess
                  (CLLM's stationary tokens: right before their context was, and kept)
  commits_BC      commits_BC[b, c]: row b's steps that committed c tokens
Greedy only (as the reference): the guesses are verified against argmax.

  sampler = Sampler(model, params, tokenizer, SamplerConfig(max_new_tokens=64), strategy=Jacobi(JacobiConfig(16)))
  state = sampler.decode(sampler.prefill(prompt_ids))
  sampler.output(state, len(prompt_ids)).tokens   # greedy decoding's tokens
  sampler.strategy.summary(sampler, state, len(prompt_ids))   # {"tokens_per_iteration": ..., ...}
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from errors import InputError, checks
from models.cache import Cache
from samplers import sampling, stopping
from samplers.sampling import SamplingConfig
from samplers.strategy import Context, Emitted, Prefill, Strategy


@dataclasses.dataclass(frozen=True)
class JacobiConfig:
    """window: the guesses n checked per step (CLLM's n_token_seq_len, 16 in the reference). sampling must be
    greedy without a repetition penalty: a config asking for anything else fails here rather than decode otherwise."""

    window: int = 16
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self):
        checks.integer("jacobi.window", self.window, minimum=1)
        if not isinstance(self.sampling, SamplingConfig):
            raise InputError(f"jacobi.sampling={self.sampling!r} must be a samplers.sampling.SamplingConfig")
        if not self.sampling.is_greedy:
            raise InputError(f"jacobi.sampling.temperature={self.sampling.temperature} must be 0: Jacobi decoding "
                             "is exact greedy decoding")
        if self.sampling.repetition_penalty != 1:
            raise InputError(f"jacobi.sampling.repetition_penalty={self.sampling.repetition_penalty} must be 1: "
                             "Jacobi decoding verifies guesses against the model's own argmax")


@flax.struct.dataclass
class JacobiState:
    cache: Cache  # every committed token but the newest
    last_token_B: jax.Array  # the newest committed token, not yet in the cache
    guesses_BW: jax.Array  # the window: guesses of the W tokens after it
    age_BW: jax.Array  # steps each guess has stood unchanged (0: new at the last step); finds stationary tokens
    iterations_B: jax.Array
    committed_B: jax.Array
    fast_forwarded_B: jax.Array
    stationary_B: jax.Array
    commits_BC: jax.Array  # [B, W + 2]: steps that committed c tokens, c = 0..W + 1


class Jacobi(Strategy):
    """Jacobi decoding as a strategy of the decode engine; self.config is a JacobiConfig."""

    def __init__(self, config: JacobiConfig = JacobiConfig()):
        self.config = config
        # A step writes the newest token and the window, and drops up to all the guesses again; the linear-attention
        # state's rollback window must hold that whole write (models/linear_state.py).
        self.tokens_per_step = self.cache_window = self.rollback_window = config.window + 1

    def prepare(self, sampler):
        capacity = sampler.config.cache_len or sampler.model.config.max_seq_len
        if self.cache_window + 1 > capacity:
            source = ("SamplerConfig.cache_len" if sampler.config.cache_len else "the model's max_seq_len")
            raise InputError(f"jacobi.window={self.config.window}: a step writes window + 1 = {self.cache_window} "
                             f"positions after the prompt, which {source}={capacity} cannot hold")
        return None

    def init(self, ctx: Context, prefill: Prefill):
        """Commits the prefill's argmax and starts the window as copies of it."""
        W = self.config.window
        B = prefill.lengths_B.shape[0]
        first_B = jnp.argmax(prefill.logits_BV, axis=-1).astype(jnp.int32)
        zeros_B = jnp.zeros((B,), jnp.int32)
        state = JacobiState(
            cache=prefill.cache,
            last_token_B=first_B,
            guesses_BW=jnp.broadcast_to(first_B[:, None], (B, W)),
            age_BW=jnp.zeros((B, W), jnp.int32),
            iterations_B=zeros_B, committed_B=zeros_B, fast_forwarded_B=zeros_B, stationary_B=zeros_B,
            commits_BC=jnp.zeros((B, W + 2), jnp.int32),
        )
        return state, Emitted(first_B[:, None], sampling.log_probs(prefill.logits_BV, first_B)[:, None],
                              jnp.ones_like(first_B))

    def step(self, ctx: Context, state: JacobiState):
        """One forward over [newest token] + window: commits the verified prefix and carries the other guesses."""
        W = self.config.window
        w_W = jnp.arange(W)
        lengths_B = state.cache.lengths_B
        # Positions this step may write: the whole window unless the cache is nearly full; none for a done row.
        room_B = jnp.full_like(lengths_B, W + 1)
        if state.cache.capacity is not None:
            room_B = jnp.clip(state.cache.capacity - lengths_B, 0, W + 1)
        written_B = jnp.where(ctx.active_B, room_B, 0)
        tokens_BT = jnp.concatenate([state.last_token_B[:, None], state.guesses_BW], axis=1)
        logits_BTV, cache = ctx.forward(tokens_BT, state.cache, written_B)
        argmax_BT = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)

        # Guess w (at position w + 1) is verified if it and every guess before it were written and equal the argmax
        # one position back.
        match_BW = (state.guesses_BW == argmax_BT[:, :W]) & (w_W[None] + 1 < written_B[:, None])
        verified_B = jnp.sum(jnp.cumprod(match_BW.astype(jnp.int32), axis=1), axis=1)
        # Commit a_0..a_k, up to and including a stop token and within the budget.
        stop_BT = stopping.is_stop_token(argmax_BT, ctx.stop_tokens)
        first_stop_B = jnp.argmax(jnp.concatenate([stop_BT, jnp.ones_like(stop_BT[:, :1])], axis=1), axis=1)
        budget_B = ctx.max_new_tokens - ctx.num_tokens_B
        count_B = jnp.minimum(jnp.minimum(verified_B, first_stop_B) + 1, budget_B)
        count_B = jnp.where(ctx.active_B, count_B, 0)
        cache = cache.rollback(lengths_B + count_B)

        # The next window: a_{k+1}..a_W, then copies of a_W. Its guess w holds the position of the old window's
        # guess k + 1 + w; it has stood unchanged if it equals that guess.
        source_BW = count_B[:, None] + w_W[None]
        guesses_BW = jnp.take_along_axis(argmax_BT, jnp.minimum(source_BW, W), axis=1)
        old_BW = jnp.minimum(source_BW, W - 1)
        kept_BW = (source_BW < W) & (jnp.take_along_axis(state.guesses_BW, old_BW, axis=1) == guesses_BW)
        age_BW = jnp.where(kept_BW, jnp.take_along_axis(state.age_BW, old_BW, axis=1) + 1, 0)

        fast_forwarded_B = jnp.maximum(count_B - 1, 0)
        stationary_B = jnp.sum((w_W[None] < fast_forwarded_B[:, None]) & (state.age_BW > 0), axis=1)
        active_B = ctx.active_B.astype(jnp.int32)
        keep = lambda new, old: jnp.where(ctx.active_B.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        new_state = JacobiState(
            cache=cache,
            last_token_B=keep(jnp.take_along_axis(argmax_BT, jnp.maximum(count_B - 1, 0)[:, None], axis=1)[:, 0],
                              state.last_token_B),
            guesses_BW=keep(guesses_BW, state.guesses_BW),
            age_BW=keep(age_BW, state.age_BW),
            iterations_B=state.iterations_B + active_B,
            committed_B=state.committed_B + count_B,
            fast_forwarded_B=state.fast_forwarded_B + fast_forwarded_B,
            stationary_B=state.stationary_B + stationary_B,
            commits_BC=state.commits_BC + jax.nn.one_hot(count_B, W + 2, dtype=jnp.int32) * active_B[:, None],
        )
        log_probs_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV, axis=-1), argmax_BT[..., None], axis=-1)
        return new_state, Emitted(argmax_BT, log_probs_BT[..., 0], count_B)

    def is_done(self, ctx: Context, state: JacobiState) -> jax.Array:
        """A row whose cache cannot take the newest token is done; a nearly full one checks fewer guesses."""
        return ~state.cache.has_room(1)

    def summary(self, sampler, state, num_prompts: int) -> dict:
        """The counts of the first `num_prompts` rows, summed, with the per-iteration rates and the forwards per
        generated token (the prefill included, as greedy decoding needs one forward per token)."""
        jacobi = state.strategy
        fetch = lambda x: sampler.fetch(x)[:num_prompts]
        iterations = int(fetch(jacobi.iterations_B).sum())
        committed, fast_forwarded, stationary = (int(fetch(x).sum()) for x in (
            jacobi.committed_B, jacobi.fast_forwarded_B, jacobi.stationary_B))
        tokens = int(fetch(state.num_tokens_B).sum())
        per_iteration = lambda count: count / iterations if iterations else None
        return {"iterations": iterations, "committed": committed, "fast_forwarded": fast_forwarded,
                "stationary": stationary, "generated_tokens": tokens,
                "tokens_per_iteration": per_iteration(committed),
                "fast_forwarded_per_iteration": per_iteration(fast_forwarded),
                "stationary_per_iteration": per_iteration(stationary),
                "forwards_per_token": (iterations + num_prompts) / tokens if tokens else None,
                "commits_histogram": np.asarray(fetch(jacobi.commits_BC)).sum(0).tolist()}
