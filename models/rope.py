"""Rotary position embeddings, in the rotate-half layout that Llama, Mistral and Qwen checkpoints use."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, scaling_type: str = "", factor: float = 8.0,
                        low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                        original_max_len: int = 8192) -> np.ndarray:
    """Per-pair rotation speeds, [head_dim // 2], with Llama 3's long-context rescaling when asked for."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling_type == "llama3":
        # Llama 3.1: slow (long-wavelength) pairs are stretched by `factor`, fast ones kept, the band between blended.
        wavelength = 2 * math.pi / inv_freq
        low_freq_wavelength = original_max_len / low_freq_factor
        high_freq_wavelength = original_max_len / high_freq_factor
        smooth = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelength > low_freq_wavelength, inv_freq / factor,
                            np.where(wavelength < high_freq_wavelength, inv_freq, blended))
    elif scaling_type:
        raise ValueError(f"unknown rope scaling type {scaling_type!r}; supported: '' or 'llama3'")
    return inv_freq.astype(np.float32)


def apply_rope(x_BTNH, positions_BT, inv_freq_F):
    """Rotates each head's (i, i + H/2) pairs by position * frequency; computed in float32."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F[None, None, :]
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTNH.dtype)


@dataclasses.dataclass(frozen=True)
class Rope:
    """An attention layer's RoPE settings; frozen and hashable, so a Linen module can hold it as a field."""

    head_dim: int
    theta: float = 10_000.0
    scaling_type: str = ""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __call__(self, x_BTNH, positions_BT):
        inv_freq_F = inverse_frequencies(self.head_dim, self.theta, self.scaling_type, self.factor,
                                         self.low_freq_factor, self.high_freq_factor, self.original_max_len)
        return apply_rope(x_BTNH, positions_BT, jnp.asarray(inv_freq_F))
