"""DiSA, diffusion step annealing (Zhao et al., arXiv 2505.20297; research notes section 3.3): later tokens of an
image are more constrained by the ones before them, so they get fewer diffusion steps. Token k of K gets

  constant   T_up
  linear     T_low + floor((upper - k) / upper * (T_up - T_low))
  cosine     T_low + floor((cos(pi k / upper) + 1) / 2 * (T_up - T_low))
  two_stage  T_up for the first half of the tokens (k < ceil(K / 2)), T_low after

with upper = K - 1 (the reference's MAR_DiSA/models/diffloss.py; upper = 1 for a one-token image). K is static, k
may be traced: the count, gathered from the [K] table, feeds samplers/denoise.py's loop bound, so annealing never
recompiles.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from errors import InputError, checks
from models.diffusion import NUM_TRAIN_STEPS

STRATEGIES = ("constant", "linear", "cosine", "two_stage")


@dataclasses.dataclass(frozen=True)
class StepSchedule:
    strategy: str = "constant"
    steps_up: int = 50  # T_up: the first token's steps (every token's under constant)
    steps_low: int = 5  # T_low: the last token's

    def __post_init__(self):
        checks.choice("strategy", self.strategy, STRATEGIES)
        checks.integer("steps_up", self.steps_up, minimum=1, maximum=NUM_TRAIN_STEPS)
        checks.integer("steps_low", self.steps_low, minimum=1, maximum=NUM_TRAIN_STEPS)
        if self.steps_low > self.steps_up:
            raise InputError(f"steps_low={self.steps_low} must be <= steps_up={self.steps_up}: DiSA anneals from "
                             "T_up down to T_low")

    def table(self, num_tokens: int) -> np.ndarray:
        """int32 [num_tokens]: the steps of every token, by the formulas in float64 as the reference computes them."""
        up, low = self.steps_up, self.steps_low
        k, upper = np.arange(num_tokens), max(num_tokens - 1, 1)
        if self.strategy == "constant":
            steps = np.full(num_tokens, up)
        elif self.strategy == "linear":
            steps = low + np.floor((upper - k) / upper * (up - low))
        elif self.strategy == "cosine":
            steps = low + np.floor((np.cos(np.pi * k / upper) + 1) / 2 * (up - low))
        else:
            steps = np.where(k < (num_tokens + 1) // 2, up, low)
        return steps.astype(np.int32)

    def num_steps(self, k, num_tokens: int):
        """int32 steps for token k (traced or not) of num_tokens: the table is a constant of the trace (float32
        arithmetic on traced k could land a floor one step off the reference's)."""
        return jnp.asarray(self.table(num_tokens))[k]
