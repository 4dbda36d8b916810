"""A decoding method is a strategy over the engine's one loop (samplers/engine.py).

The engine owns the host side (tokenizing, buckets, padding, sharding, stop rules, output, streaming), the prefill
of the target model and one jitted `lax.while_loop`. A strategy says what happens inside:

  init(ctx, prefill) -> (state, Emitted)   how it starts from the prefilled cache and the last prompt logits
  step(ctx, state)   -> (state, Emitted)   one step of the loop (usually one forward of the target)
  is_done(ctx, state) -> done_B            when a row can go no further (besides the engine's stop rules)
  output(sampler, state, num_prompts)      how its result is read on the host (default: the emitted sequences)

and declares static sizes: tokens_per_step (the most tokens one step emits per row; speculative and Jacobi decoding
emit several), cache_window (positions one step writes past a row's length) and rollback_window (tokens the
target cache must be able to drop again, models/cache.py). `prepare(sampler)` places any arrays it needs besides
the target's parameters (an n-gram store, a draft model's parameters) once; they come back as `ctx.constants`.

The state is the strategy's own pytree (a flax.struct.dataclass): it may hold any number of caches (a draft
model's too), keys and buffers. Every array in it is batch-major ([B, ...]) except scalars and caches, which is
how the engine shards it. A step emits 0..tokens_per_step tokens per row (`Emitted`); the engine writes them at
each row's own position, cuts a row at a stop token or stop sequence anywhere inside the chunk, and ends it at the
token budget. Done rows still run (the batch is fixed): a step must leave their caches as they are, which
`ctx.active_B` tells it.
"""

import dataclasses

import flax.struct
import jax

from models.cache import Cache


@flax.struct.dataclass
class Prefill:
    """What the engine hands a strategy once the prompts are in the target model's cache (a strategy that keeps
    another cache, a draft model's, sizes it by cache.capacity and prefills it from prompt_BP)."""

    logits_BV: jax.Array  # the target's logits at each row's last prompt position
    cache: Cache  # the target's cache holding the prompts
    prompt_BP: jax.Array  # the right-padded prompt ids the target was fed (padding 0)
    lengths_B: jax.Array
    rng: jax.Array


@flax.struct.dataclass
class Emitted:
    """Row b's new tokens are tokens_BC[b, :count_B[b]], with the target's log-probs of them."""

    tokens_BC: jax.Array
    log_probs_BC: jax.Array
    count_B: jax.Array


@dataclasses.dataclass(frozen=True)
class Context:
    """What a strategy's jitted functions may read: the target model, its parameters, the strategy's prepared
    constants, and the engine's view of the rows."""

    model: object  # the target: a models/ Linen module
    params: dict
    constants: object  # whatever Strategy.prepare returned, placed on the devices
    active_B: jax.Array  # rows not done yet; a step must not advance the others
    tokens_BN: jax.Array  # the tokens emitted so far (stopping.MASKED after each row's count)
    num_tokens_B: jax.Array
    max_new_tokens: jax.Array  # int32 scalar, traced: changing it does not recompile
    step: jax.Array  # int32 scalar: strategy calls so far (0 in init)
    stop_tokens: tuple[int, ...]

    def forward(self, tokens, cache: Cache, num_new_B=None, **kwargs):
        """(logits, cache) of the target model on new tokens continuing `cache`."""
        return self.model.apply({"params": self.params}, tokens, cache, num_new_B, **kwargs)


class Strategy:
    """Defaults for a strategy that emits one token per step from a `cache` field of its state."""

    tokens_per_step: int = 1
    cache_window: int = 1
    rollback_window: int = 0
    done_reason: str = "cache_full"  # the stop reason of a row that is_done ends

    def prepare(self, sampler):
        return None

    def init(self, ctx: Context, prefill: Prefill):
        raise NotImplementedError

    def step(self, ctx: Context, state):
        raise NotImplementedError

    def is_done(self, ctx: Context, state) -> jax.Array:
        """A row whose cache has no room for the next step's writes is done."""
        return ~state.cache.has_room(self.cache_window)

    def output(self, sampler, state, num_prompts: int):
        return sampler.sequences(state, num_prompts)
