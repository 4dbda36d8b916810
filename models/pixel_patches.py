"""Raw pixel patches as the image model's continuous tokens: a [H, W, 3] uint8 image is cut into (H / p) x (W / p)
patches of p x p pixels, each flattened to p * p * 3 values scaled to [-1, 1], in raster order.

Why not a KL autoencoder (MAR's KL-16, Orthus's VQ-GAN latents)? Those compress 256^2+ photographs to a latent grid
an AR backbone can afford. The shapes world (data/shapes_world.py) is 32 x 32 pixels of six palette colours on
black with hard edges: 4 x 4 patches already make a short sequence (64 tokens of 48 values), every value is one
of two levels (0 or 255 per channel), and the scorer (metrics/geneval_shapes.py) reads exact colours and shapes off
the pixels, which a small autoencoder trained on 2 CPU cores would blur at its edges. An autoencoder would add a
training stage and a reconstruction error to every sample and buy no length at this size.
"""

import einops
import jax.numpy as jnp

from errors import InputError

CHANNELS = 3


def check_tiling(image_size: int, patch_size: int, key: str = "config.model") -> None:
    if patch_size < 1 or image_size < 1 or image_size % patch_size:
        raise InputError(f"{key}.image_size={image_size} cannot be tiled by {key}.patch_size={patch_size}: the "
                         "patch size must be >= 1 and divide the image size")


def token_dim(patch_size: int) -> int:
    return patch_size * patch_size * CHANNELS


def to_tokens(image_BHWC, patch_size: int):
    """uint8 images -> float32 tokens [B, (H / p) (W / p), p p 3] in [-1, 1], raster order of patches."""
    pixels = image_BHWC.astype(jnp.float32) / 127.5 - 1
    return einops.rearrange(pixels, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size, q=patch_size)


def to_images(tokens_BKC, image_size: int, patch_size: int):
    """Tokens (any real values) -> uint8 images [B, H, W, 3], clipped to the pixel range."""
    grid = image_size // patch_size
    pixels = einops.rearrange(tokens_BKC, "b (h w) (p q c) -> b (h p) (w q) c", h=grid, w=grid, p=patch_size,
                              q=patch_size)
    return jnp.clip(jnp.round((pixels + 1) * 127.5), 0, 255).astype(jnp.uint8)
