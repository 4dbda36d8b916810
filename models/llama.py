"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.

One module covers Llama 2/3, Mistral and Qwen2/3 (q/k/v biases, q/k norms) and, by `mixer_pattern`, the
linear-attention decoder (TransNormerLLM token mixer, models/linear_attention.py) or a hybrid of both. Which mixer a
layer uses (architecture) and which kernel runs it (implementation) are separate fields. Usage:

  model = Model(Config(...))
  params = model.init(rng, *model.example_inputs())["params"]
  loss, metrics = model.loss(params, {"tokens": tokens_BT1}, rng)                    # training
  cache = model.init_cache(batch_size, cache_len)
  logits_BTV, cache = model.apply({"params": params}, prompt_BT, cache, prompt_lengths_B)  # prefill
  logits_B1V, cache = model.apply({"params": params}, next_B1, cache)                  # one decode step

The methods example_inputs, loss, flops_per_token and init_cache are the model contract that train.py,
evaluate.py, the decode engine and the checkpoint code rely on (models/registry.py).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from errors import InputError, checks
from models import matryoshka_kv, token_tree
from models.attention import IMPLEMENTATIONS as SOFTMAX_IMPLEMENTATIONS, Attention
from models.cache import Cache
from models.layers import RMSNorm, SwiGLU
from models.linear_attention import LightningMixer, layer_decay
from models.rope import Rope
from pallas_kernels.lightning_attention import (
    DECODE_IMPLEMENTATIONS as LIGHTNING_DECODE_IMPLEMENTATIONS,
    IMPLEMENTATIONS as LIGHTNING_IMPLEMENTATIONS,
)

MIXERS = ("softmax", "lightning")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = {
    "none": None,
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # save matmul outputs only
}


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
    # Architecture: the token mixer of each layer, a comma-separated pattern repeated over the layers, e.g.
    # "softmax", "lightning", or "lightning,softmax" (softmax attention in every second layer).
    mixer_pattern: str = "softmax"
    # Implementation: which kernel runs each mixer.
    softmax_implementation: str = "xla"  # models.attention.IMPLEMENTATIONS
    lightning_implementation: str = "chunked"  # the sequence kernel: pallas_kernels.lightning_attention
    lightning_decode_implementation: str = "jnp"  # the one-token step: "jnp" or "pallas"
    lightning_block_size: int = 64
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: str = "none"
    # MatryoshkaKV (models/matryoshka_kv.py): softmax layers cache kv_rank columns of each KV head's orthogonal key
    # and value basis; 0 = off (no parameters added). Per-head ranks, each in [1, kv_rank], layer-major
    # (num_layers * num_kv_heads entries; lightning layers' entries are unused); () = every head at kv_rank.
    kv_rank: int = 0
    kv_key_ranks: tuple = ()
    kv_value_ranks: tuple = ()
    # The MatryoshkaKV file (tools/matryoshka_pca.py's matryoshka_kv.npz) whose bases evaluation and benchmarks put
    # into restored parameters (checkpoints/restore.py); "" = the parameters' own. The module never reads it.
    kv_bases: str = ""

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                     "max_seq_len", "rope_original_max_len", "lightning_block_size"):
            checks.integer(f"config.model.{name}", getattr(self, name), minimum=1)
        checks.multiple("config.model.num_heads", self.num_heads, self.num_kv_heads, "config.model.num_kv_heads")
        mixers = self.mixer_pattern.split(",") if isinstance(self.mixer_pattern, str) else [self.mixer_pattern]
        for mixer in mixers:
            if mixer not in MIXERS:
                raise InputError(f"config.model.mixer_pattern={self.mixer_pattern!r}: {mixer!r} is not a mixer; a "
                                 f"comma-separated pattern of {', '.join(MIXERS)}")
        if "softmax" in mixers and self.head_dim % 2:
            raise InputError(f"config.model.head_dim={self.head_dim} must be even: RoPE rotates pairs of dimensions")
        checks.number("config.model.rope_theta", self.rope_theta, above=0)
        checks.choice("config.model.rope_scaling_type", self.rope_scaling_type, ("", "llama3"))
        if self.rope_scaling_type == "llama3":
            checks.number("config.model.rope_scaling_factor", self.rope_scaling_factor, above=0)
            checks.number("config.model.rope_low_freq_factor", self.rope_low_freq_factor, above=0)
            checks.number("config.model.rope_high_freq_factor", self.rope_high_freq_factor,
                          above=self.rope_low_freq_factor)
        checks.number("config.model.norm_eps", self.norm_eps, above=0)
        for name in ("tie_embeddings", "qkv_bias", "qk_norm"):
            checks.choice(f"config.model.{name}", getattr(self, name), (True, False))
        checks.choice("config.model.softmax_implementation", self.softmax_implementation, SOFTMAX_IMPLEMENTATIONS)
        checks.choice("config.model.lightning_implementation", self.lightning_implementation,
                      LIGHTNING_IMPLEMENTATIONS)
        checks.choice("config.model.lightning_decode_implementation", self.lightning_decode_implementation,
                      LIGHTNING_DECODE_IMPLEMENTATIONS)
        if self.lightning_implementation == "pallas" and self.lightning_block_size % 8:
            raise InputError(f"config.model.lightning_block_size={self.lightning_block_size} must be a multiple of 8 "
                             "for lightning_implementation='pallas' (TPU sublane tiling)")
        checks.choice("config.model.dtype", self.dtype, DTYPES)
        checks.choice("config.model.remat", self.remat, tuple(REMAT_POLICIES))
        # Normalized to tuples (hashable, as a module attribute must be): command lines may give lists.
        object.__setattr__(self, "kv_key_ranks", matryoshka_kv.checked_ranks(self, "kv_key_ranks"))
        object.__setattr__(self, "kv_value_ranks", matryoshka_kv.checked_ranks(self, "kv_value_ranks"))
        if not isinstance(self.kv_bases, str) or (self.kv_bases and not self.kv_rank):
            raise InputError(f"config.model.kv_bases={self.kv_bases!r} must be '' or the path of a MatryoshkaKV file "
                             "(tools/matryoshka_pca.py's matryoshka_kv.npz) with config.model.kv_rank > 0")

    def kv_ranks(self, layer_index: int) -> tuple[tuple, tuple]:
        """Layer `layer_index`'s MatryoshkaKV key and value ranks per KV head ((), () for kv_rank everywhere)."""
        K = self.num_kv_heads
        return tuple(tuple(ranks[layer_index * K:(layer_index + 1) * K])
                     for ranks in (self.kv_key_ranks, self.kv_value_ranks))

    def mixer(self, layer_index: int) -> str:
        pattern = self.mixer_pattern.split(",")
        return pattern[layer_index % len(pattern)]

    @property
    def rope(self) -> Rope:
        return Rope(self.head_dim, self.rope_theta, self.rope_scaling_type, self.rope_scaling_factor,
                    self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_max_len)


def residual_init_scale(cfg: Config) -> float:
    return 1.0 / (2 * cfg.num_layers)  # GPT-2: residual branches start small in deep stacks


def make_mixer(cfg: Config, layer_index: int, parent=None) -> nn.Module:
    """Layer `layer_index`'s token mixer; every mixer is called as
    mixer(x_BTD, positions_BT, num_new_B, cache, tree_mask_TN) and owns its cache (init_cache). parent None: a
    detached module whose methods need no parameters."""
    dtype = jnp.dtype(cfg.dtype)
    if cfg.mixer(layer_index) == "softmax":
        return Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope, cfg.softmax_implementation, dtype,
                         cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps, residual_init_scale(cfg), cfg.kv_rank,
                         *cfg.kv_ranks(layer_index), name="attention", parent=parent)
    decay_H = tuple(layer_decay(cfg.num_heads, layer_index, cfg.num_layers).tolist())
    return LightningMixer(cfg.num_heads, cfg.head_dim, decay_H, cfg.lightning_implementation,
                          cfg.lightning_decode_implementation, cfg.lightning_block_size, dtype, cfg.norm_eps,
                          residual_init_scale(cfg), name="lightning", parent=parent)


def next_token_loss(logits_BTV, targets_BT):
    """Mean cross-entropy in nats per token, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT).mean()


class Block(nn.Module):
    config: Config
    layer_index: int

    @nn.compact
    def __call__(self, x_BTD, positions_BT, num_new_B, cache, tree_mask_TN=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h_BTD = RMSNorm(cfg.norm_eps, dtype, "embed", name="attention_norm")(x_BTD)
        h_BTD, cache = make_mixer(cfg, self.layer_index, parent=self)(h_BTD, positions_BT, num_new_B, cache,
                                                                      tree_mask_TN)
        x_BTD = x_BTD + h_BTD
        h_BTD = SwiGLU(cfg.mlp_dim, dtype, residual_init_scale(cfg), name="mlp")(
            RMSNorm(cfg.norm_eps, dtype, "embed", name="mlp_norm")(x_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD + h_BTD, ("act_batch", "act_len", "act_embed"))
        return x_BTD, cache


class Model(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, tokens_BT, cache: Cache | None = None, num_new_B=None, token_weights_BTK=None,
                 logits_at_B=None, tree_mask_TN=None):
        """Logits for every position, and the cache with these tokens appended.

        Without a cache the tokens start at position 0 (training). With one, row b continues at
        cache.lengths_B[b]; only its first num_new_B[b] tokens (default: all) count as written, so right-padded
        prompts of different lengths prefill in one call. With token_weights_BTK, tokens are [B, T, K] and each
        position's input is the weighted sum of its K token embeddings (Superposed Decoding's superposition).
        With logits_at_B, only row b's position logits_at_B[b] is unembedded ([B, 1, V]): a prefill samples one
        position per row, and unembedding all T would cost T times more. With tree_mask_TN (a static [T, N]
        numpy array, models/token_tree.py) the tokens are nodes of a token tree continuing the cache: each sees
        the prefix and its ancestors, at position prefix length + depth.
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
        if tree_mask_TN is None:
            positions_BT = offsets_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        else:
            tree_start_B = offsets_B - (tree_mask_TN.shape[1] - T)
            positions_BT = tree_start_B[:, None] + jnp.asarray(token_tree.depths(tree_mask_TN), jnp.int32)[None]
        if cache is not None and num_new_B is None:
            num_new_B = jnp.full((B,), T, jnp.int32)

        block_class = Block
        if cfg.remat != "none":
            block_class = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
        new_layers = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache.layers[i]
            x_BTD, layer_cache = block_class(cfg, i, name=f"layer_{i}")(x_BTD, positions_BT, num_new_B, layer_cache,
                                                                        tree_mask_TN)
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
        return logits_BTV, None if cache is None else cache.advance(new_layers, num_new_B)

    # ---------------------------------------------------------------------------------------------------------
    # The model contract (models/registry.py).
    # ---------------------------------------------------------------------------------------------------------

    batch_format = "text"  # loss reads packed windows of the corpus (data/pipeline.py)

    def decode_params(self, params):
        """The parameters in the form decoding runs fastest with (the engine calls this once): MatryoshkaKV's
        decode form (fixed bases, U_v^T folded into the output projections), else `params` unchanged."""
        if not self.config.kv_rank:
            return params
        params = dict(params)
        for i in range(self.config.num_layers):
            attention = params[f"layer_{i}"].get("attention", {})
            if matryoshka_kv.SUBTREE not in attention or "key_skew" not in attention[matryoshka_kv.SUBTREE]:
                continue
            key_ranks, value_ranks = self.config.kv_ranks(i)
            every = (self.config.kv_rank,) * self.config.num_kv_heads
            subtree, projection = matryoshka_kv.decode_form(attention[matryoshka_kv.SUBTREE], attention["out_kernel"],
                                                            key_ranks or every, value_ranks or every,
                                                            self.config.kv_rank)
            params[f"layer_{i}"] = {**params[f"layer_{i}"],
                                    "attention": {**attention, matryoshka_kv.SUBTREE: subtree, **projection}}
        return params

    def example_inputs(self, batch_size: int = 1, seq_len: int = 1) -> tuple:
        """Arguments of `init` (and of eval_shape or lowering a forward) at the given size."""
        return (jnp.zeros((batch_size, seq_len), jnp.int32),)

    def loss(self, params, batch: dict, rng=None) -> tuple[jax.Array, dict]:
        """Next-token cross-entropy on batch["tokens"] [B, T + 1] (inputs [:, :-1], targets [:, 1:])."""
        del rng  # deterministic: no dropout
        tokens_BT1 = batch["tokens"]
        logits_BTV, _ = self.apply({"params": params}, tokens_BT1[:, :-1])
        loss = next_token_loss(logits_BTV, tokens_BT1[:, 1:])
        return loss, {"loss": loss}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 per matmul weight (the unembedding included,
        the input embedding a lookup), plus the token mixing of each layer with seq_len-token sequences:
          softmax    causal attention, half of T^2: 6 T N H
          lightning  intra-block products of half a block of C tokens, and the state read and write:
                     3 N (2 C H + 4 H^2)  (query and key width H, value width H)"""
        cfg = self.config
        N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
        weights = D * cfg.vocab_size
        mixing = 0
        for i in range(cfg.num_layers):
            weights += 3 * D * cfg.mlp_dim
            if cfg.mixer(i) == "softmax":
                weights += 2 * D * N * H + 2 * D * K * H  # query, out; key, value
                mixing += 6 * seq_len * N * H
            else:
                weights += 4 * D * N * H + D * H + H * N * H  # query, key, value, out; the low-rank gate
                mixing += 3 * N * (2 * cfg.lightning_block_size * H + 4 * H * H)
        return 6 * weights + mixing

    def init_cache(self, batch_size: int, cache_len: int, rollback_window: int = 0) -> Cache:
        """Each layer's own empty cache (keys and values for softmax layers, a fixed-size state for lightning
        ones), able to roll back the last `rollback_window` tokens written (decoding strategies that verify
        drafts need it; models/cache.py)."""
        layers = tuple(make_mixer(self.config, i).init_cache(batch_size, cache_len, rollback_window)
                       for i in range(self.config.num_layers))
        return Cache(layers, jnp.zeros((batch_size,), jnp.int32))
