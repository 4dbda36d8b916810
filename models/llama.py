"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.

One module covers Llama 2/3, Mistral and Qwen2/3 (q/k/v biases, q/k norms), and with attention="lightning" the
linear-attention decoder (TransNormerLLM token mixer, models/linear_attention.py), optionally hybrid with softmax
attention in every `softmax_every`-th layer. Usage:

  model = Model(Config(...))
  params = model.init(rng, tokens_BT)["params"]
  logits_BTV, _ = model.apply({"params": params}, tokens_BT)                          # training forward
  cache = model.init_cache(batch_size, cache_len)
  logits_BTV, cache = model.apply({"params": params}, prompt_BT, cache, prompt_lengths_B)  # prefill
  logits_B1V, cache = model.apply({"params": params}, next_B1, cache)                  # one decode step
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import kv_cache
from models.attention import Attention
from models.layers import RMSNorm, SwiGLU
from models.linear_attention import LightningMixer, LinearState, layer_decay
from models.rope import inverse_frequencies


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    rope_scaling_type: str = ""
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    attention: str = "xla"  # models.attention.IMPLEMENTATIONS, or "lightning"
    lightning_implementation: str = "chunked"  # pallas_kernels.lightning_attention.IMPLEMENTATIONS
    lightning_block_size: int = 64
    softmax_every: int = 0  # with attention="lightning": every N-th layer keeps softmax attention (0 = none)
    dtype: str = "float32"
    remat: str = "none"

    def uses_softmax(self, layer_index: int) -> bool:
        if self.attention != "lightning":
            return True
        return self.softmax_every > 0 and (layer_index + 1) % self.softmax_every == 0


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # save matmul outputs only
}


class Block(nn.Module):
    config: Config
    layer_index: int

    @nn.compact
    def __call__(self, x_BTD, positions_BT, num_new_B, inv_freq_F, cache):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        out_init_scale = 1.0 / (2 * cfg.num_layers)  # GPT-2: residual branches start small in deep stacks
        h_BTD = RMSNorm(cfg.norm_eps, dtype, "embed", name="attention_norm")(x_BTD)
        if cfg.uses_softmax(self.layer_index):
            softmax_implementation = "xla" if cfg.attention == "lightning" else cfg.attention
            h_BTD, cache = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, softmax_implementation, dtype,
                                     cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps, out_init_scale, name="attention")(
                h_BTD, positions_BT, inv_freq_F, cache)
        else:
            decay_H = tuple(layer_decay(cfg.num_heads, self.layer_index, cfg.num_layers).tolist())
            h_BTD, cache = LightningMixer(cfg.num_heads, cfg.head_dim, decay_H, cfg.lightning_implementation,
                                          cfg.lightning_block_size, dtype, cfg.norm_eps, out_init_scale,
                                          name="lightning")(h_BTD, num_new_B, cache)
        x_BTD = x_BTD + h_BTD
        h_BTD = SwiGLU(cfg.mlp_dim, dtype, out_init_scale, name="mlp")(
            RMSNorm(cfg.norm_eps, dtype, "embed", name="mlp_norm")(x_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD + h_BTD, ("act_batch", "act_len", "act_embed"))
        return x_BTD, cache


class Model(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, tokens_BT, cache: kv_cache.Cache | None = None, num_new_B=None, token_weights_BTK=None,
                 logits_at_B=None):
        """Logits for every position, and the cache with these tokens appended.

        Without a cache the tokens start at position 0 (training). With one, row b continues at
        cache.lengths_B[b]; only its first num_new_B[b] tokens (default: all) count as written, so right-padded
        prompts of different lengths prefill in one call. With token_weights_BTK, tokens are [B, T, K] and each
        position's input is the weighted sum of its K token embeddings (Superposed Decoding's superposition).
        With logits_at_B, only row b's position logits_at_B[b] is unembedded ([B, 1, V]): a prefill samples one
        position per row, and unembedding all T would cost T times more.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        B, T = tokens_BT.shape[:2]
        embedding_VD = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                            ("vocab", "embed")),
                                  (cfg.vocab_size, cfg.embed_dim), jnp.float32)
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
        if token_weights_BTK is not None:
            x_BTD = jnp.einsum("btkd,btk->btd", x_BTD, token_weights_BTK.astype(jnp.float32))
        x_BTD = nn.with_logical_constraint(x_BTD.astype(dtype), ("act_batch", "act_len", "act_embed"))

        offsets_B = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths_B
        positions_BT = offsets_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        inv_freq_F = jnp.asarray(inverse_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor, cfg.rope_original_max_len))

        block_class = Block
        if cfg.remat != "none":
            block_class = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
        if cache is not None and num_new_B is None:
            num_new_B = jnp.full((B,), T, jnp.int32)
        new_layers = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache.layers[i]
            x_BTD, layer_cache = block_class(cfg, i, name=f"layer_{i}")(x_BTD, positions_BT, num_new_B, inv_freq_F,
                                                                        layer_cache)
            new_layers.append(layer_cache)
        x_BTD = RMSNorm(cfg.norm_eps, dtype, "embed", name="final_norm")(x_BTD)
        if logits_at_B is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_B[:, None, None], axis=1)

        if cfg.tie_embeddings:
            logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, embedding_VD.astype(dtype))
        else:
            logits_BTV = nn.DenseGeneral(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                         name="lm_head", kernel_init=nn.with_logical_partitioning(
                                             nn.initializers.normal(1 / math.sqrt(cfg.embed_dim)),
                                             ("embed", "vocab")))(x_BTD)
        logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))

        if cache is not None:
            cache = kv_cache.Cache(tuple(new_layers), cache.lengths_B + num_new_B)
        return logits_BTV, cache

    def init_cache(self, batch_size: int, cache_len: int) -> kv_cache.Cache:
        """Empty caches: keys and values for softmax layers, a fixed-size float32 state for lightning layers."""
        cfg = self.config
        kv_shape = (batch_size, cfg.num_kv_heads, cache_len, cfg.head_dim)
        state_shape = (batch_size, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        layers = tuple(
            kv_cache.LayerKV(jnp.zeros(kv_shape, cfg.dtype), jnp.zeros(kv_shape, cfg.dtype))
            if cfg.uses_softmax(i) else LinearState(jnp.zeros(state_shape, jnp.float32))
            for i in range(cfg.num_layers))
        return kv_cache.Cache(layers, jnp.zeros((batch_size,), jnp.int32))
