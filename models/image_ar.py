"""Text-to-image with continuous tokens (Orthus, MAR's diffusion loss; research notes section 3): the Llama decoder
reads a caption, then the image's tokens in raster order; an LM head predicts the caption's next token and a
diffusion head (models/diffusion_head.py), conditioned on the hidden state before each image token, denoises it.

A row of the batch (data/image_pipeline.py, batch_format "shapes_images") is

  text_BL   the caption's tokens, its end-of-text token last and padding (that same token) in front: every row has
            L tokens, at least one of them padding, so the first caption token has a position to be predicted from
  image     its tokens x_1..x_K (models/pixel_patches.py: 4 x 4 pixel patches in [-1, 1]), projected in by a Linear

so the sequence is text_1..text_L, x_1..x_{K-1}; position L - 1 + k predicts x_{k+1} (position L - 1, the caption's
end, predicts x_1). The loss is

  text       cross-entropy of the caption's tokens and its end (masked to them), as the language model's
  diffusion  models/diffusion.py's loss of the head on every image token, diffusion_batch_mul (t, eps) draws each
  loss = text_weight * text + diffusion

For classifier-free guidance a caption_drop_rate of the rows have their caption replaced by the null caption, L
padding tokens (the row's own first token, which is padding), and no text loss. Sampling
(samplers/image_tokens.py) prefills the caption and the null caption and runs the head per token.

The backbone is models/llama.py's: its Block, norms, cache and config fields (Config extends llama.Config), so
bf16 (dtype), remat and the logical-axis sharding rules work as for the language model. `__call__` returns the final
hidden states (decode outputs for the engine, which the two heads read: `text_logits`, `predict`); at
initialisation it also runs both heads, so that model.init creates every parameter.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from errors import checks
from models import diffusion, llama, pixel_patches
from models.cache import Cache
from models.diffusion_head import FREQUENCY_DIM, DiffusionHead
from models.layers import RMSNorm, dense_init


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    image_size: int = 32
    patch_size: int = 4
    head_width: int = 256
    head_blocks: int = 3
    schedule: str = "cosine"  # models.diffusion.SCHEDULES
    prediction: str = "epsilon"  # models.diffusion.PREDICTIONS
    diffusion_batch_mul: int = 4
    caption_drop_rate: float = 0.1
    text_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        pixel_patches.check_tiling(self.image_size, self.patch_size)
        checks.integer("config.model.head_width", self.head_width, minimum=1)
        checks.integer("config.model.head_blocks", self.head_blocks, minimum=0)
        checks.choice("config.model.schedule", self.schedule, diffusion.SCHEDULES)
        checks.choice("config.model.prediction", self.prediction, diffusion.PREDICTIONS)
        checks.integer("config.model.diffusion_batch_mul", self.diffusion_batch_mul, minimum=1)
        checks.number("config.model.caption_drop_rate", self.caption_drop_rate, minimum=0, below=1)
        checks.number("config.model.text_weight", self.text_weight, minimum=0)

    @property
    def token_dim(self) -> int:
        return pixel_patches.token_dim(self.patch_size)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def backbone(config: Config) -> llama.Model:
    """The Llama model with the same backbone fields, detached: its FLOPs and cache are this model's backbone's."""
    fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(llama.Config)}
    return llama.Model(llama.Config(**fields), parent=None)


class Model(nn.Module):
    config: Config
    batch_format = "shapes_images"

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.embedding_VD = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                                 ("vocab", "embed")),
                                       (cfg.vocab_size, cfg.embed_dim), jnp.float32)
        self.token_in = nn.Dense(cfg.embed_dim, dtype=dtype, param_dtype=jnp.float32,
                                 kernel_init=nn.with_logical_partitioning(dense_init(), ("token", "embed")),
                                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
        block = llama.Block if cfg.remat == "none" else nn.remat(llama.Block, policy=llama.REMAT_POLICIES[cfg.remat],
                                                                 prevent_cse=True)
        self.layers = [block(cfg, i) for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.norm_eps, dtype, "embed")
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                    kernel_init=nn.with_logical_partitioning(dense_init(), ("embed", "vocab")))
        self.head = DiffusionHead(cfg.token_dim, cfg.head_width, cfg.head_blocks, dtype)

    def __call__(self, tokens_BT, cache: Cache | None = None, num_new_B=None, logits_at_B=None, image_tokens_BSC=None):
        """Final hidden states [B, T + S, D] of text tokens_BT (or None) followed by image tokens image_tokens_BSC
        (or None), and the cache with them appended (models/llama.py's rules: without a cache from position 0;
        with one from each row's length, num_new_B of them counted as written). logits_at_B (the engine's name):
        only row b's position logits_at_B[b] is returned, [B, 1, D]."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        parts = []
        if tokens_BT is not None:
            parts.append(jnp.take(self.embedding_VD, tokens_BT, axis=0).astype(dtype))
        if image_tokens_BSC is not None:
            parts.append(self.token_in(image_tokens_BSC.astype(dtype)))
        x_BTD = nn.with_logical_constraint(jnp.concatenate(parts, axis=1), ("act_batch", "act_len", "act_embed"))
        B, T = x_BTD.shape[:2]
        offsets_B = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths_B
        positions_BT = offsets_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        if cache is not None and num_new_B is None:
            num_new_B = jnp.full((B,), T, jnp.int32)
        new_layers = []
        for i, layer in enumerate(self.layers):
            x_BTD, layer_cache = layer(x_BTD, positions_BT, num_new_B, None if cache is None else cache.layers[i])
            new_layers.append(layer_cache)
        hidden_BTD = self.final_norm(x_BTD)
        if logits_at_B is not None:
            hidden_BTD = jnp.take_along_axis(hidden_BTD, logits_at_B[:, None, None], axis=1)
        if self.is_initializing():  # create the heads' parameters too
            self.text_logits(hidden_BTD)
            self.predict(jnp.zeros((B, cfg.token_dim), jnp.float32), jnp.zeros((B,), jnp.int32), hidden_BTD[:, 0])
        return hidden_BTD, None if cache is None else cache.advance(new_layers, num_new_B)

    def text_logits(self, hidden_BTD):
        """The LM head: float32 logits [B, T, V]."""
        if self.config.tie_embeddings:
            logits_BTV = jnp.einsum("btd,vd->btv", hidden_BTD, self.embedding_VD.astype(hidden_BTD.dtype))
        else:
            logits_BTV = self.lm_head(hidden_BTD)
        return nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))

    def predict(self, x_t_NC, t_N, condition_ND):
        """The diffusion head's eps or v (config.prediction) for noisy tokens at steps t_N, float32 [N, C]."""
        return self.head(x_t_NC, t_N, condition_ND)

    # ---------------------------------------------------------------------------------------------------------
    # The model contract (models/registry.py).
    # ---------------------------------------------------------------------------------------------------------

    def example_inputs(self, batch_size: int = 1, seq_len: int = 1) -> tuple:
        """A text token and an image token per row (no parameter depends on the lengths)."""
        del seq_len
        return (jnp.zeros((batch_size, 1), jnp.int32), None, None, None,
                jnp.zeros((batch_size, 1, self.config.token_dim), jnp.float32))

    def loss(self, params, batch: dict, rng=None) -> tuple[jax.Array, dict]:
        """The loss above on a "shapes_images" batch; rng draws the dropped captions and the diffusion's (t, eps)
        (None, for validation: no caption dropped, the draws of key 0)."""
        cfg = self.config
        text_BL, image_tokens_BKC = batch["text"], pixel_patches.to_tokens(batch["image"], cfg.patch_size)
        B, L = text_BL.shape
        K, C = image_tokens_BKC.shape[1:]
        caption_tokens_B = batch["caption_tokens"]
        noise_rng = jax.random.key(0)
        if rng is not None:
            drop_rng, noise_rng = jax.random.split(rng)
            dropped_B = jax.random.bernoulli(drop_rng, cfg.caption_drop_rate, (B,))
            text_BL = jnp.where(dropped_B[:, None], text_BL[:, :1], text_BL)  # the null caption: all padding
            caption_tokens_B = jnp.where(dropped_B, 0, caption_tokens_B)
        hidden_BTD, _ = self.apply({"params": params}, text_BL, image_tokens_BSC=image_tokens_BKC[:, :-1])

        logits_BLV = self.apply({"params": params}, hidden_BTD[:, :L - 1], method=Model.text_logits)
        target_index_L = jnp.arange(1, L)
        counted_BL = target_index_L[None] >= (L - caption_tokens_B)[:, None]
        cross_entropy_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, text_BL[:, 1:])
        text_loss = jnp.sum(jnp.where(counted_BL, cross_entropy_BL, 0.0)) / jnp.maximum(jnp.sum(counted_BL), 1)

        predict = lambda x_t_NC, t_N, condition_ND: self.apply({"params": params}, x_t_NC, t_N, condition_ND,
                                                               method=Model.predict)
        t_M, eps_MC = diffusion.draw(noise_rng, B * K, C, cfg.diffusion_batch_mul)
        diffusion_loss = diffusion.loss(predict, cfg.prediction, diffusion.make_schedule(cfg.schedule),
                                        image_tokens_BKC.reshape(B * K, C),
                                        hidden_BTD[:, L - 1:].reshape(B * K, -1), jnp.ones((B * K,)), t_M, eps_MC)
        loss = cfg.text_weight * text_loss + diffusion_loss
        return loss, {"loss": loss, "text_loss": text_loss, "diffusion_loss": diffusion_loss}

    def flops_per_token(self, seq_len: int) -> float:
        """The backbone's training FLOPs per position (models/llama.py's count, its input projection added), plus
        the head's: forward and backward of its weights on diffusion_batch_mul copies of each image token, spread
        over the seq_len positions of a row."""
        cfg = self.config
        W, C, D = cfg.head_width, cfg.token_dim, cfg.embed_dim
        head_weights = FREQUENCY_DIM * W + W * W + D * W + C * W + cfg.head_blocks * 5 * W * W + 2 * W * W + W * C
        image_share = min(cfg.num_image_tokens / seq_len, 1.0)
        return (backbone(cfg).flops_per_token(seq_len) + 6 * C * D * image_share
                + 6 * cfg.diffusion_batch_mul * head_weights * image_share)

    def decode_params(self, params):
        """The parameters as decoding runs them (the contract's newer member, which the engine calls once): this
        family decodes with its parameters as they are."""
        return params

    def init_cache(self, batch_size: int, cache_len: int, rollback_window: int = 0) -> Cache:
        """The backbone's cache (models/llama.py)."""
        return backbone(self.config).init_cache(batch_size, cache_len, rollback_window)
