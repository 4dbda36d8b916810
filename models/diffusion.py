"""The Gaussian diffusion that a per-token diffusion head is trained under (MAR, Orthus; research notes section 3).

A token x0 [C] is noised to x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps over NUM_TRAIN_STEPS = 1000 steps, with
abar_t the cumulative product of 1 - beta_t and the betas from a named schedule:

  cosine         Nichol & Dhariwal's: abar(t) = cos^2((t / T + 0.008) / 1.008 * pi / 2), beta capped at 0.999
                 (MAR, via ADM's GaussianDiffusion)
  scaled_linear  diffusers': beta linear in sqrt from 0.00085 to 0.012 (Orthus, Stable Diffusion)

The head predicts either the noise eps ("epsilon", MAR) or the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
("v", Orthus); `to_x0_and_eps` turns either back into (x0, eps), which both samplers step with
(samplers/denoise.py). The training loss is the mean squared error of the prediction, each token repeated
batch_mul times with independent (t, eps) draws (MAR's diffusion_batch_mul), averaged over the tokens its mask
keeps. MAR's learned variance (its VLB term) is left out: the samplers use the fixed posterior variance.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_STEPS = 1000
SCHEDULES = ("cosine", "scaled_linear")
PREDICTIONS = ("epsilon", "v")


@flax.struct.dataclass
class Schedule:
    """abar_t for t = 0..T-1 (float32 [T]); everything else is derived from it."""

    alphas_cumprod_T: jax.Array

    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod_T.shape[0]


def betas(name: str, num_steps: int = NUM_TRAIN_STEPS) -> np.ndarray:
    """The float64 betas [num_steps] of schedule `name` (SCHEDULES)."""
    if name == "cosine":
        alpha_bar = lambda s: math.cos((s / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999) for i in range(num_steps)])
    if name == "scaled_linear":
        return np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_steps) ** 2
    raise ValueError(f"schedule {name!r} is not one of {', '.join(SCHEDULES)}")


def make_schedule(name: str, num_steps: int = NUM_TRAIN_STEPS) -> Schedule:
    """The cumulative products computed in float64, then stored float32 (as ADM and diffusers do)."""
    return Schedule(jnp.asarray(np.cumprod(1 - betas(name, num_steps)), jnp.float32))


def q_sample(schedule: Schedule, x0_NC, t_N, eps_NC):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: token n noised to step t_N[n]."""
    abar_N1 = schedule.alphas_cumprod_T[t_N][:, None]
    return jnp.sqrt(abar_N1) * x0_NC + jnp.sqrt(1 - abar_N1) * eps_NC


def target(prediction: str, schedule: Schedule, x0_NC, t_N, eps_NC):
    """What the head is trained to output: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    if prediction == "epsilon":
        return eps_NC
    abar_N1 = schedule.alphas_cumprod_T[t_N][:, None]
    return jnp.sqrt(abar_N1) * eps_NC - jnp.sqrt(1 - abar_N1) * x0_NC


def to_x0_and_eps(prediction: str, x_t_NC, abar_N1, prediction_NC):
    """(x0, eps) implied by the head's output at x_t, whose noise level is abar_N1 [N, 1]."""
    if prediction == "epsilon":
        eps_NC = prediction_NC
        return (x_t_NC - jnp.sqrt(1 - abar_N1) * eps_NC) / jnp.sqrt(abar_N1), eps_NC
    x0_NC = jnp.sqrt(abar_N1) * x_t_NC - jnp.sqrt(1 - abar_N1) * prediction_NC
    eps_NC = jnp.sqrt(abar_N1) * prediction_NC + jnp.sqrt(1 - abar_N1) * x_t_NC
    return x0_NC, eps_NC


def draw(rng, num_tokens: int, token_dim: int, batch_mul: int, num_steps: int = NUM_TRAIN_STEPS):
    """(t_M, eps_MC) for M = num_tokens * batch_mul noised copies: copy m is of token m // batch_mul."""
    t_rng, eps_rng = jax.random.split(rng)
    M = num_tokens * batch_mul
    return (jax.random.randint(t_rng, (M,), 0, num_steps),
            jax.random.normal(eps_rng, (M, token_dim), jnp.float32))


def loss(predict, prediction: str, schedule: Schedule, x0_NC, condition_ND, mask_N, t_M, eps_MC):
    """Masked mean over tokens of the per-token mean squared error of predict(x_t, t, condition), each token's
    batch_mul = M / N copies noised by (t_M, eps_MC) (draw); 0 when the mask keeps nothing.

    predict(x_t_MC, t_M, condition_MD) -> [M, C] is the diffusion head."""
    batch_mul = t_M.shape[0] // x0_NC.shape[0]
    x0_MC = jnp.repeat(x0_NC, batch_mul, axis=0)
    x_t_MC = q_sample(schedule, x0_MC, t_M, eps_MC)
    predicted_MC = predict(x_t_MC, t_M, jnp.repeat(condition_ND, batch_mul, axis=0)).astype(jnp.float32)
    error_M = jnp.mean((predicted_MC - target(prediction, schedule, x0_MC, t_M, eps_MC)) ** 2, axis=-1)
    mask_M = jnp.repeat(mask_N, batch_mul, axis=0).astype(jnp.float32)
    return jnp.sum(error_M * mask_M) / jnp.maximum(jnp.sum(mask_M), 1)
