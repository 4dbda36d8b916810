"""The image model (models/image_ar.py): pixel patches, its loss, its cached decode against its full forward, and
image sampling through the decode engine (samplers/image_tokens.py) against an uncached reference loop, sharded
and not."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from errors import InputError
from models import diffusion, image_ar, pixel_patches
from parallel import mesh as mesh_lib
from samplers import denoise
from samplers.denoise import DenoiseConfig
from samplers.disa import StepSchedule
from samplers.engine import Sampler, SamplerConfig
from samplers.image_tokens import DiffusionTokens

L = 6  # text tokens per row


def tiny(**overrides) -> image_ar.Model:
    fields = dict(vocab_size=32, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_seq_len=64, image_size=8, patch_size=4, head_width=32, head_blocks=1)
    return image_ar.Model(image_ar.Config(**{**fields, **overrides}))


def init(model):
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *model.example_inputs())["params"])
    # Fresh adaLN and output layers are zero: perturb everything so the head's output depends on its inputs.
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: x + np.float32(0.05) * rng.standard_normal(x.shape, np.float32), params)


def batch(model, B=3, seed=0):
    rng = np.random.default_rng(seed)
    size = model.config.image_size
    text = rng.integers(1, model.config.vocab_size, (B, L)).astype(np.int32)
    caption_tokens = np.array([3, 5, 1, 4][:B], np.int32)
    text[np.arange(L)[None] < (L - caption_tokens)[:, None]] = 0  # left padding, as the pipeline lays rows out
    return {"text": jnp.asarray(text), "caption_tokens": jnp.asarray(caption_tokens),
            "image": jnp.asarray(rng.integers(0, 256, (B, size, size, 3)).astype(np.uint8))}


def test_pixel_patches_are_raster_order_and_invert():
    image = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    tokens = np.asarray(pixel_patches.to_tokens(jnp.asarray(image), 4))
    assert tokens.shape == (2, 4, 48)
    np.testing.assert_allclose(tokens[1, 1], image[1, 0:4, 4:8].reshape(-1) / 127.5 - 1, atol=1e-6)  # top right
    np.testing.assert_allclose(tokens[0, 2], image[0, 4:8, 0:4].reshape(-1) / 127.5 - 1, atol=1e-6)  # bottom left
    assert np.array_equal(pixel_patches.to_images(jnp.asarray(tokens), 8, 4), image)
    assert np.array_equal(pixel_patches.to_images(jnp.full((1, 4, 48), 7.0), 8, 4), np.full((1, 8, 8, 3), 255))


def test_bad_config_values_are_one_line_errors():
    with pytest.raises(InputError, match=r"config.model.image_size=30 cannot be tiled by config.model.patch_size=4"):
        tiny(image_size=30)
    with pytest.raises(InputError, match=r"config.model.caption_drop_rate=1.0 must be a finite number >= 0 and < 1"):
        tiny(caption_drop_rate=1.0)
    with pytest.raises(InputError, match=r"config.model.schedule='linear' is not one of 'cosine', 'scaled_linear'"):
        tiny(schedule="linear")
    with pytest.raises(InputError, match=r"config.model.diffusion_batch_mul=0 must be an integer >= 1"):
        tiny(diffusion_batch_mul=0)


def test_loss_trains_both_heads_and_dropped_captions_have_no_text_loss():
    model = tiny(caption_drop_rate=0.0)
    params, rows = init(model), batch(model)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(model.loss, has_aux=True))(params, rows, jax.random.key(2))
    assert np.isfinite(loss) and metrics["text_loss"] > 0 and metrics["diffusion_loss"] > 0
    np.testing.assert_allclose(loss, metrics["text_loss"] + metrics["diffusion_loss"], rtol=1e-6)
    for name in ("embedding", "token_in", "layers_0", "head"):
        assert any(np.any(g) for g in jax.tree.leaves(grads[name])), name
    # The text loss is the mean cross-entropy of exactly the caption's tokens (and its end).
    log_probs = np.asarray(jax.jit(lambda p, text: jax.nn.log_softmax(model.apply(
        {"params": p}, model.apply({"params": p}, text)[0], method="text_logits")))(params, rows["text"]))
    text, counts = np.asarray(rows["text"]), np.asarray(rows["caption_tokens"])
    nll = [-log_probs[b, j - 1, text[b, j]] for b in range(len(text)) for j in range(max(L - counts[b], 1), L)]
    np.testing.assert_allclose(metrics["text_loss"], np.mean(nll), rtol=1e-5)
    _, all_dropped = jax.jit(tiny(caption_drop_rate=0.999999).loss)(params, rows, jax.random.key(2))
    assert float(all_dropped["text_loss"]) == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_decode_equals_full_forward(dtype):
    model = tiny(dtype=dtype)
    params, rows = init(model), batch(model)
    forward = jax.jit(lambda text, cache, num_new, tokens: model.apply({"params": params}, text, cache, num_new,
                                                                      image_tokens_BSC=tokens))
    image_tokens = pixel_patches.to_tokens(rows["image"], 4)
    B, K = image_tokens.shape[:2]
    full, _ = forward(rows["text"], None, None, image_tokens)

    padded = jnp.zeros((B, 16), jnp.int32).at[:, :L].set(rows["text"])  # a prompt bucket wider than the prompt
    prefill, cache = forward(padded, model.init_cache(B, 32), jnp.full((B,), L, jnp.int32), None)
    steps = [prefill[:, :L]]
    for k in range(K):
        hidden, cache = forward(None, cache, jnp.ones((B,), jnp.int32), image_tokens[:, k:k + 1])
        steps.append(hidden)
    cached = jnp.concatenate(steps, axis=1)
    tolerance = 1e-5 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(np.asarray(cached, np.float32), np.asarray(full, np.float32), atol=tolerance,
                               rtol=tolerance)
    predict = jax.jit(lambda h: model.apply({"params": params}, image_tokens[:, 0], jnp.full((B,), 500), h,
                                            method="predict"))
    np.testing.assert_allclose(predict(cached[:, L + 1]), predict(full[:, L + 1]), atol=tolerance * 4,
                               rtol=tolerance * 4)


def reference_images(model, params, prompts, seed, strategy: DiffusionTokens):
    """Token by token without a cache: the full forward over the prompt and the tokens so far, the head's sampler
    on the last hidden state (and on the null caption's, guided), with the strategy's keys."""
    cfg = model.config
    text = jnp.asarray(prompts, jnp.int32)
    null = jnp.broadcast_to(text[:, :1], text.shape)
    tokens = jnp.zeros((len(prompts), 0, cfg.token_dim))
    predict = lambda x, t, c: model.apply({"params": params}, x, t, c, method="predict")
    last = jax.jit(lambda rows, tokens: model.apply({"params": params}, rows, image_tokens_BSC=tokens)[0][:, -1])
    sample = jax.jit(lambda condition, null, num_steps, rng: denoise.sample(
        predict, cfg.prediction, diffusion.make_schedule(cfg.schedule), condition, num_steps, rng, strategy.denoise,
        cfg.token_dim, null))
    rng = jax.random.key(seed)
    for k in range(cfg.num_image_tokens):
        token = sample(last(text, tokens), last(null, tokens) if strategy.guided else None,
                       strategy.steps.num_steps(k, cfg.num_image_tokens), jax.random.fold_in(rng, k))
        tokens = jnp.concatenate([tokens, token[:, None]], axis=1)
    return np.asarray(pixel_patches.to_images(tokens, cfg.image_size, cfg.patch_size))


@pytest.mark.parametrize("method,guidance,schedule", [
    ("ddpm", 2.5, StepSchedule("linear", 6, 2)),
    pytest.param("ddim", 1.0, StepSchedule("cosine", 5, 3), marks=pytest.mark.slow),  # unguided, v-prediction
])
def test_engine_sampling_equals_the_uncached_reference(method, guidance, schedule):
    model = tiny(prediction="v" if method == "ddim" else "epsilon")
    params = init(model)
    prompts = [list(row) for row in np.asarray(batch(model)["text"])]
    strategy = DiffusionTokens(DenoiseConfig(method, 0.9, guidance, clip_x0=True), schedule)
    sampler = Sampler(model, params, None, SamplerConfig(max_new_tokens=model.config.num_image_tokens),
                      strategy=strategy)
    images = sampler.generate_tokens(prompts, seed=3)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    expected = reference_images(model, params, prompts, 3, strategy)
    assert np.abs(images.astype(int) - expected).max() <= 1  # a pixel may round the other way
    assert not np.array_equal(images[0], images[1])  # different captions, different images


@pytest.mark.slow
def test_sharded_sampling_equals_unsharded():
    model = tiny()
    params = init(model)
    prompts = [list(row) for row in np.asarray(batch(model)["text"])]
    strategy = DiffusionTokens(DenoiseConfig("ddpm", 1.0, 3.0, clip_x0=True), StepSchedule("linear", 6, 2))
    engine_config = SamplerConfig(max_new_tokens=model.config.num_image_tokens)
    plain = Sampler(model, params, None, engine_config, strategy=strategy).generate_tokens(prompts, seed=1)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=1, tensor=2)))
    sharded = Sampler(model, params, None, engine_config, strategy=strategy, mesh=mesh,
                      rules=mesh_lib.LOGICAL_AXIS_RULES).generate_tokens(prompts, seed=1)
    assert np.abs(plain.astype(int) - sharded).max() <= 1
