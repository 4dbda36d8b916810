"""Image generation by the image model (models/image_ar.py) as a strategy of the decode engine: after the caption's
prefill, each step makes one continuous image token, in raster order, by running the diffusion head's sampler
(samplers/denoise.py) on the backbone's last hidden state, then feeds that token back through the backbone and its
KV cache. Token k gets the DiSA schedule's step count (samplers/disa.py), a traced loop bound.

  sampler = Sampler(model, params, tokenizer, SamplerConfig(max_new_tokens=model.config.num_image_tokens),
                    strategy=DiffusionTokens(DenoiseConfig("ddpm", 1.0, 3.0), StepSchedule("linear", 50, 5)))
  images_NHWC = sampler.generate_tokens(prompts)       # uint8 numpy, one image per prompt

Prompts are data/image_pipeline.py's prompt_tokens rows (the caption left-padded, its end-of-text last). With a
guidance scale other than 1 the strategy also prefills the null caption (every token the prompt's leading pad) in
its init and keeps it as rows B..2B-1 of its cache: each step then runs the backbone once on 2B rows (the token
just made fed to both halves) and the head once on 2B rows (samplers/denoise.py), so guidance costs no extra
calls. The engine emits one placeholder token (0) per image token, so its token budget and stop rules see K tokens.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import diffusion, pixel_patches
from models.cache import Cache
from samplers import denoise
from samplers.denoise import DenoiseConfig
from samplers.disa import StepSchedule
from samplers.strategy import Context, Emitted, Prefill, Strategy


@flax.struct.dataclass
class ImageState:
    cache: Cache  # B rows of captions, then B of the null caption when guided
    hidden_BD: jax.Array  # the backbone's last hidden state per cache row: the next token's condition
    tokens_BKC: jax.Array  # the image tokens made so far (float32, zeros after k)
    k: jax.Array  # int32 scalar: tokens made
    rng: jax.Array


def _concatenate_rows(first: Cache, second: Cache) -> Cache:
    """Two caches as one with the second's rows after the first's (every cache array is batch-major)."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)


@dataclasses.dataclass(frozen=True)
class DiffusionTokens(Strategy):
    denoise: DenoiseConfig = DenoiseConfig()
    steps: StepSchedule = StepSchedule()
    done_reason: str = "image_complete"

    @property
    def guided(self) -> bool:
        return self.denoise.guidance_scale != 1

    def init(self, ctx: Context, prefill: Prefill):
        cfg = ctx.model.config
        hidden_BD, cache = prefill.logits_BV, prefill.cache  # the image model's decode output is its hidden state
        B = hidden_BD.shape[0]
        if self.guided:
            null_BP = jnp.broadcast_to(prefill.prompt_BP[:, :1], prefill.prompt_BP.shape)
            capacity = cache.capacity or prefill.prompt_BP.shape[1]  # None: fixed-size states, which ignore it
            null_hidden_B1D, null_cache = ctx.model.apply(
                {"params": ctx.params}, null_BP, ctx.model.init_cache(B, capacity), prefill.lengths_B,
                logits_at_B=prefill.lengths_B - 1)
            hidden_BD = jnp.concatenate([hidden_BD, null_hidden_B1D[:, 0]])
            cache = _concatenate_rows(cache, null_cache)
        state = ImageState(cache, hidden_BD, jnp.zeros((B, cfg.num_image_tokens, cfg.token_dim), jnp.float32),
                           jnp.zeros((), jnp.int32), prefill.rng)
        return self._make_token(ctx, state)

    def step(self, ctx: Context, state: ImageState):
        last_B1C = jax.lax.dynamic_slice_in_dim(state.tokens_BKC, state.k - 1, 1, axis=1)
        num_new_B = ctx.active_B.astype(jnp.int32)
        if self.guided:
            last_B1C, num_new_B = jnp.concatenate([last_B1C, last_B1C]), jnp.concatenate([num_new_B, num_new_B])
        hidden_B1D, cache = ctx.model.apply({"params": ctx.params}, None, state.cache, num_new_B,
                                            image_tokens_BSC=last_B1C)
        return self._make_token(ctx, state.replace(cache=cache, hidden_BD=hidden_B1D[:, 0]))

    def _make_token(self, ctx: Context, state: ImageState):
        cfg = ctx.model.config
        B = state.tokens_BKC.shape[0]
        predict = lambda x_t_NC, t_N, condition_ND: ctx.model.apply({"params": ctx.params}, x_t_NC, t_N, condition_ND,
                                                                    method="predict")
        null_BD = state.hidden_BD[B:] if self.guided else None
        token_BC = denoise.sample(predict, cfg.prediction, diffusion.make_schedule(cfg.schedule), state.hidden_BD[:B],
                                  self.steps.num_steps(state.k, cfg.num_image_tokens),
                                  jax.random.fold_in(state.rng, state.k), self.denoise, cfg.token_dim, null_BD)
        old_BC = jax.lax.dynamic_index_in_dim(state.tokens_BKC, state.k, axis=1, keepdims=False)
        token_BC = jnp.where(ctx.active_B[:, None], token_BC, old_BC)  # rows already done stay as they are
        tokens_BKC = jax.lax.dynamic_update_index_in_dim(state.tokens_BKC, token_BC, state.k, axis=1)
        emitted = Emitted(jnp.zeros((B, 1), jnp.int32), jnp.zeros((B, 1), jnp.float32), jnp.ones((B,), jnp.int32))
        return state.replace(tokens_BKC=tokens_BKC, k=state.k + 1), emitted

    def is_done(self, ctx: Context, state: ImageState) -> jax.Array:
        B = state.tokens_BKC.shape[0]
        complete = state.k >= ctx.model.config.num_image_tokens
        return complete | ~state.cache.has_room(self.cache_window)[:B]

    def output(self, sampler, state, num_prompts: int) -> np.ndarray:
        """uint8 images [num_prompts, H, W, 3]."""
        cfg = sampler.model.config
        tokens_BKC = sampler.fetch(state.strategy.tokens_BKC)[:num_prompts]
        return np.asarray(pixel_patches.to_images(jnp.asarray(tokens_BKC), cfg.image_size, cfg.patch_size))
