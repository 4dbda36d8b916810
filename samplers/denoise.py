"""Sampling one continuous token from a diffusion head: DDPM or DDIM over respaced timesteps, with classifier-free
guidance; the number of steps is a traced scalar, so a per-token step count (DiSA, samplers/disa.py) neither
recompiles nor runs more iterations than it asks for.

  x0_BC = denoise.sample(predict, "epsilon", schedule, condition_BD, num_steps, rng, DenoiseConfig(...),
                         token_dim, null_condition_BD)

`predict(x_t_NC, t_N, condition_ND) -> [N, C]` is the head (models/diffusion_head.py). S steps visit the trailing
respaced timesteps tau_i = (S - i) T // S - 1, i = 0..S-1 (from T - 1, pure noise, down; tau_S = -1 is the clean
token, abar = 1), gathered from the training schedule inside the loop. Each step turns the head's output into
(x0, eps) (models/diffusion.py) and moves from tau_i to tau_{i+1}:

  ddpm  the respaced posterior q(x_prev | x_t, x0) (ADM's respacing): beta = 1 - abar_t / abar_prev, mean
        beta sqrt(abar_prev) / (1 - abar_t) x0 + (1 - abar_prev) sqrt(1 - beta) / (1 - abar_t) x_t, the fixed small
        variance beta (1 - abar_prev) / (1 - abar_t); `temperature` scales the added noise (MAR's temperature)
  ddim  deterministic (eta = 0): sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps; `temperature` scales the starting
        noise, its only randomness

With clip_x0 the predicted x0 is clipped to [-1, 1] before either step uses it (ADM's clip_denoised, for tokens that
are pixels), and eps is re-derived from it.

Guidance: with a null condition the head runs once per step on the conditional and unconditional rows stacked
([2B]), and the prediction is pred_u + guidance_scale (pred_c - pred_u) (Orthus, MAR's forward_with_cfg).
"""

import dataclasses

import jax
import jax.numpy as jnp

from errors import checks
from models import diffusion

METHODS = ("ddpm", "ddim")


@dataclasses.dataclass(frozen=True)
class DenoiseConfig:
    method: str = "ddpm"
    temperature: float = 1.0
    guidance_scale: float = 1.0  # 1: the conditional prediction; 0: the unconditional one; > 1: guided past it
    clip_x0: bool = False  # clip the predicted x0 to [-1, 1] (ADM's clip_denoised: tokens of pixels in [-1, 1])

    def __post_init__(self):
        checks.choice("method", self.method, METHODS)
        checks.number("temperature", self.temperature, minimum=0)
        checks.number("guidance_scale", self.guidance_scale, minimum=0)
        checks.choice("clip_x0", self.clip_x0, (True, False))


def respaced_timestep(i, num_steps, num_train_steps: int):
    """tau_i of num_steps trailing steps: T - 1 at i = 0, -1 (the clean token) at i = num_steps."""
    return (num_steps - i) * num_train_steps // num_steps - 1


def sample(predict, prediction: str, schedule: diffusion.Schedule, condition_BD, num_steps, rng,
           config: DenoiseConfig, token_dim: int, null_condition_BD=None):
    """x0 [B, token_dim] (float32) after num_steps (an int32 scalar, traced or not, >= 1) steps from noise;
    null_condition_BD (the head's condition for the caption-free prompt) turns guidance on."""
    B, C = condition_BD.shape[0], token_dim
    T = schedule.num_steps
    init_rng, step_rng = jax.random.split(rng)
    x_BC = jax.random.normal(init_rng, (B, C), jnp.float32)
    if config.method == "ddim":
        x_BC = x_BC * config.temperature
    conditions = condition_BD if null_condition_BD is None else jnp.concatenate([condition_BD, null_condition_BD])

    def guided(x_BC, t):
        if null_condition_BD is None:
            return predict(x_BC, jnp.full((B,), t), conditions).astype(jnp.float32)
        both_2BC = predict(jnp.concatenate([x_BC, x_BC]), jnp.full((2 * B,), t), conditions).astype(jnp.float32)
        conditional_BC, unconditional_BC = both_2BC[:B], both_2BC[B:]
        return unconditional_BC + config.guidance_scale * (conditional_BC - unconditional_BC)

    def step(i, x_BC):
        t, t_prev = respaced_timestep(i, num_steps, T), respaced_timestep(i + 1, num_steps, T)
        abar = schedule.alphas_cumprod_T[t]
        abar_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod_T[jnp.maximum(t_prev, 0)], 1.0)
        x0_BC, eps_BC = diffusion.to_x0_and_eps(prediction, x_BC, abar, guided(x_BC, t))
        if config.clip_x0:  # and eps re-derived from the clipped x0, as ADM's DDIM does
            x0_BC = jnp.clip(x0_BC, -1, 1)
            eps_BC = (x_BC - jnp.sqrt(abar) * x0_BC) / jnp.sqrt(1 - abar)
        if config.method == "ddim":
            return jnp.sqrt(abar_prev) * x0_BC + jnp.sqrt(1 - abar_prev) * eps_BC
        beta = 1 - abar / abar_prev
        mean_BC = (beta * jnp.sqrt(abar_prev) * x0_BC + (1 - abar_prev) * jnp.sqrt(1 - beta) * x_BC) / (1 - abar)
        variance = beta * (1 - abar_prev) / (1 - abar)
        noise_BC = jax.random.normal(jax.random.fold_in(step_rng, i), (B, C), jnp.float32)
        return mean_BC + config.temperature * jnp.sqrt(variance) * noise_BC

    return jax.lax.fori_loop(0, num_steps, step, x_BC)

