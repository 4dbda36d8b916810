"""Plain sampling: one forward and one token per step, drawn by the rules of samplers/sampling.py (greedy,
temperature, top-k, top-p, min-p, repetition penalty).

  sampler = Sampler(model, params, tokenizer, SamplerConfig(max_new_tokens=64),
                    strategy=PlainSampling(SamplingConfig(temperature=0.8, top_p=0.9)))
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from models.cache import Cache
from samplers import sampling, stopping
from samplers.sampling import SamplingConfig
from samplers.strategy import Context, Emitted, Prefill, Strategy


@flax.struct.dataclass
class PlainState:
    prompt_BP: jax.Array  # the history the repetition penalty reads, with the tokens emitted so far
    last_token_B: jax.Array  # the newest token, not yet written to the cache
    cache: Cache
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class PlainSampling(Strategy):
    sampling: SamplingConfig = SamplingConfig()

    def init(self, ctx: Context, prefill: Prefill):
        prompt_len = prefill.prompt_BP.shape[1]
        written_BP = jnp.arange(prompt_len)[None] < prefill.lengths_B[:, None]
        history_BP = jnp.where(written_BP, prefill.prompt_BP, stopping.MASKED)  # the penalty ignores MASKED
        state = PlainState(history_BP, jnp.zeros_like(prefill.lengths_B), prefill.cache, prefill.rng)
        return self._sample(ctx, state, prefill.logits_BV)

    def step(self, ctx: Context, state: PlainState):
        logits_B1V, cache = ctx.forward(state.last_token_B[:, None], state.cache, ctx.active_B.astype(jnp.int32))
        return self._sample(ctx, state.replace(cache=cache), logits_B1V[:, 0])

    def _sample(self, ctx: Context, state: PlainState, logits_BV):
        history_BH = None
        if self.sampling.repetition_penalty != 1:
            history_BH = jnp.concatenate([state.prompt_BP, ctx.tokens_BN], axis=1)
        token_B = sampling.sample(jax.random.fold_in(state.rng, ctx.step), logits_BV, self.sampling, history_BH)
        emitted = Emitted(token_B[:, None], sampling.log_probs(logits_BV, token_B)[:, None],
                          jnp.ones_like(token_B))
        return state.replace(last_token_B=token_B), emitted
