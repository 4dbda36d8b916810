"""The diffusion under the image model's head (models/diffusion.py), its samplers (samplers/denoise.py) and DiSA's
step schedules (samplers/disa.py), each against a plain-numpy transcription at small sizes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import InputError
from models import diffusion
from samplers import denoise, disa
from samplers.denoise import DenoiseConfig

C, D = 3, 4  # token and condition widths


def numpy_alphas_cumprod(name, T):
    if name == "cosine":  # improved DDPM, eq. 17, vectorised
        s = np.arange(T + 1) / T
        f = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))
    return np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2)


@pytest.mark.parametrize("name", diffusion.SCHEDULES)
def test_schedules_match_numpy(name):
    schedule = diffusion.make_schedule(name)
    np.testing.assert_allclose(schedule.alphas_cumprod_T, numpy_alphas_cumprod(name, 1000), rtol=1e-6, atol=1e-9)
    assert schedule.num_steps == 1000 and np.all(np.diff(np.asarray(schedule.alphas_cumprod_T)) < 0)


class Linear:
    """A stand-in head, linear in (x_t, t, condition), with its numpy twin."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.W, self.V, self.a = rng.normal(size=(C, C)) * 0.5, rng.normal(size=(D, C)) * 0.5, rng.normal(size=(1, C))

    def __call__(self, x_NC, t_N, condition_ND):
        self.calls.append(x_NC.shape[0])
        return x_NC @ self.W + condition_ND @ self.V + (t_N[:, None] / 1000.0) * self.a

    def numpy(self, x_NC, t_N, condition_ND):
        return x_NC @ self.W + condition_ND @ self.V + (np.asarray(t_N)[:, None] / 1000.0) * self.a

    calls: list


def head():
    h = Linear()
    h.calls = []
    return h


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_q_sample_and_loss_match_numpy_with_fixed_draws(prediction):
    schedule = diffusion.make_schedule("cosine")
    abar = np.asarray(schedule.alphas_cumprod_T, np.float64)
    rng = np.random.default_rng(1)
    N, batch_mul = 5, 3
    x0_NC, condition_ND = rng.normal(size=(N, C)), rng.normal(size=(N, D))
    mask_N = np.array([1, 0, 1, 1, 0])
    t_M, eps_MC = diffusion.draw(jax.random.key(0), N, C, batch_mul)
    assert t_M.shape == (N * batch_mul,) and eps_MC.shape == (N * batch_mul, C)
    t, eps = np.asarray(t_M), np.asarray(eps_MC, np.float64)

    x0_M, cond_M = np.repeat(x0_NC, batch_mul, 0), np.repeat(condition_ND, batch_mul, 0)
    x_t = np.sqrt(abar[t])[:, None] * x0_M + np.sqrt(1 - abar[t])[:, None] * eps
    np.testing.assert_allclose(diffusion.q_sample(schedule, jnp.asarray(x0_M, jnp.float32), t_M, eps_MC), x_t,
                               rtol=1e-5, atol=1e-5)
    wanted = eps if prediction == "epsilon" else np.sqrt(abar[t])[:, None] * eps - np.sqrt(1 - abar[t])[:, None] * x0_M
    h = head()
    error_M = ((h.numpy(x_t, t, cond_M) - wanted) ** 2).mean(-1)
    mask_M = np.repeat(mask_N, batch_mul)
    expected = (error_M * mask_M).sum() / mask_M.sum()
    got = diffusion.loss(h, prediction, schedule, jnp.asarray(x0_NC, jnp.float32),
                         jnp.asarray(condition_ND, jnp.float32), jnp.asarray(mask_N), t_M, eps_MC)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    nothing = diffusion.loss(h, prediction, schedule, jnp.asarray(x0_NC, jnp.float32),
                             jnp.asarray(condition_ND, jnp.float32), jnp.zeros(N), t_M, eps_MC)
    assert float(nothing) == 0.0


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_to_x0_and_eps_inverts_the_targets(prediction):
    schedule = diffusion.make_schedule("scaled_linear")
    rng = np.random.default_rng(2)
    x0, eps, t = rng.normal(size=(4, C)), rng.normal(size=(4, C)), jnp.array([0, 10, 500, 999])
    x0, eps = jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32)
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    abar_N1 = schedule.alphas_cumprod_T[t][:, None]
    predicted = diffusion.target(prediction, schedule, x0, t, eps)
    got_x0, got_eps = diffusion.to_x0_and_eps(prediction, x_t, abar_N1, predicted)
    np.testing.assert_allclose(got_eps, eps, atol=2e-4)
    np.testing.assert_allclose(got_x0, x0, atol=2e-3 if prediction == "epsilon" else 2e-4)


def numpy_sample(h, prediction, abar, condition, null_condition, num_steps, rng, config):
    """The samplers step by step in float64, with the noise jax draws from the same keys."""
    T = len(abar)
    B = condition.shape[0]
    init_rng, step_rng = jax.random.split(rng)
    x = np.asarray(jax.random.normal(init_rng, (B, C)), np.float64)
    if config.method == "ddim":
        x = x * config.temperature
    taus = [(num_steps - i) * T // num_steps - 1 for i in range(num_steps + 1)]
    for i in range(num_steps):
        t, t_prev = taus[i], taus[i + 1]
        a, a_prev = abar[t], (abar[t_prev] if t_prev >= 0 else 1.0)
        pred = h.numpy(x, np.full(B, t), condition)
        if null_condition is not None:
            pred_u = h.numpy(x, np.full(B, t), null_condition)
            pred = pred_u + config.guidance_scale * (pred - pred_u)
        if prediction == "epsilon":
            eps, x0 = pred, (x - np.sqrt(1 - a) * pred) / np.sqrt(a)
        else:
            x0, eps = np.sqrt(a) * x - np.sqrt(1 - a) * pred, np.sqrt(a) * pred + np.sqrt(1 - a) * x
        if config.clip_x0:
            x0 = np.clip(x0, -1, 1)
            eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        if config.method == "ddim":
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
        else:
            beta = 1 - a / a_prev
            mean = beta * np.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * np.sqrt(1 - beta) / (1 - a) * x
            noise = np.asarray(jax.random.normal(jax.random.fold_in(step_rng, i), (B, C)), np.float64)
            x = mean + config.temperature * np.sqrt(beta * (1 - a_prev) / (1 - a)) * noise
    return x


def test_respaced_timesteps():
    assert [denoise.respaced_timestep(i, 1000, 1000) for i in (0, 1, 999, 1000)] == [999, 998, 0, -1]
    assert [denoise.respaced_timestep(i, 4, 1000) for i in range(5)] == [999, 749, 499, 249, -1]
    assert [denoise.respaced_timestep(i, 1, 1000) for i in range(2)] == [999, -1]


@pytest.mark.parametrize("method,prediction,schedule_name,temperature,guidance,clip",
                         [("ddpm", "epsilon", "cosine", 1.0, None, False),
                          ("ddpm", "v", "scaled_linear", 0.7, 3.0, True),
                          ("ddim", "epsilon", "cosine", 1.0, 2.0, True),
                          ("ddim", "v", "scaled_linear", 0.5, None, False)])
def test_samplers_match_numpy_for_traced_step_counts(method, prediction, schedule_name, temperature, guidance, clip):
    schedule = diffusion.make_schedule(schedule_name)
    abar = np.asarray(schedule.alphas_cumprod_T, np.float64)
    config = DenoiseConfig(method, temperature, 1.0 if guidance is None else guidance, clip)
    rng = np.random.default_rng(3)
    condition, null_condition = rng.normal(size=(2, D)), rng.normal(size=(2, D)) if guidance else None
    h, traces = head(), []

    @jax.jit
    def sample(num_steps, key):
        traces.append(1)
        return denoise.sample(h, prediction, schedule, jnp.asarray(condition, jnp.float32), num_steps, key, config,
                              C, None if null_condition is None else jnp.asarray(null_condition, jnp.float32))

    for num_steps in (1, 3, 7):
        key = jax.random.key(num_steps)
        got = sample(jnp.int32(num_steps), key)
        want = numpy_sample(h, prediction, abar, condition, null_condition, num_steps, key, config)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    assert len(traces) == 1  # the step count is traced: no recompilation
    assert h.calls == [4 if guidance else 2]  # one head call per step, conditional and null rows stacked


def test_guidance_scale_one_is_the_conditional_prediction_and_zero_the_unconditional():
    schedule = diffusion.make_schedule("cosine")
    rng = np.random.default_rng(4)
    condition, null_condition = (jnp.asarray(rng.normal(size=(2, D)), jnp.float32) for _ in range(2))
    h, key = head(), jax.random.key(5)
    sample = lambda c, s, null=None: denoise.sample(h, "epsilon", schedule, c, 4, key, DenoiseConfig("ddpm", 1.0, s),
                                                    C, null)
    np.testing.assert_allclose(sample(condition, 1.0, null_condition), sample(condition, 1.0), rtol=1e-5)
    np.testing.assert_allclose(sample(condition, 0.0, null_condition), sample(null_condition, 1.0), rtol=1e-5)


def python_disa(strategy, k, K, up, low):
    """The reference's formulas (MAR_DiSA/models/diffloss.py) in float64."""
    upper = max(K - 1, 1)
    if strategy == "constant":
        return up
    if strategy == "linear":
        return low + math.floor((upper - k) / upper * (up - low))
    if strategy == "cosine":
        return low + math.floor((math.cos(math.pi * k / upper) + 1) / 2 * (up - low))
    return up if k < (K + 1) // 2 else low


@pytest.mark.parametrize("strategy", disa.STRATEGIES)
def test_disa_schedules_match_the_reference_formulas(strategy):
    for K, up, low in ((64, 50, 5), (16, 100, 5), (7, 25, 15), (2, 50, 5), (1, 50, 5), (64, 9, 9)):
        schedule = disa.StepSchedule(strategy, up, low)
        jitted = jax.jit(lambda k: schedule.num_steps(k, K))
        got = [int(jitted(k)) for k in range(K)]
        assert got == [python_disa(strategy, k, K, up, low) for k in range(K)], (K, up, low)
        assert got[0] == up and min(got) >= low
        if strategy != "constant" and K > 1:
            assert got[-1] == low


def test_bad_sampler_settings_are_one_line_errors():
    with pytest.raises(InputError, match=r"steps_low=60 must be <= steps_up=50"):
        disa.StepSchedule("linear", 50, 60)
    with pytest.raises(InputError, match=r"guidance_scale=-1.0 must be a finite number >= 0"):
        DenoiseConfig("ddim", 1.0, -1.0)
    with pytest.raises(InputError, match=r"method='euler' is not one of"):
        DenoiseConfig("euler")
    with pytest.raises(InputError, match=r"strategy='exp' is not one of"):
        disa.StepSchedule("exp")
