"""Sampling rules as small pure functions over logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

Each filter takes float32 `logits_BV` and returns logits of the same shape with removed entries set to -inf, as the
Hugging Face transformers logits processors do. `process_logits` chains them in the order `generate` uses
(repetition penalty, then temperature, top-k, top-p, min-p), and `sample` draws one token per row with a key
derived from (rng, row index), so a row's token does not depend on how the batch is sharded across devices.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from errors import InputError, checks

# -inf, as transformers uses: exp(-inf) is exactly 0, so removed tokens carry no probability mass.
FILTERED = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to turn logits into a token; frozen and hashable so it can be a static jit argument.

    temperature 0 means greedy (argmax after the repetition penalty); top_k 0, top_p 1, min_p 0 and
    repetition_penalty 1 each switch that rule off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        # `not x >= 0` style comparisons also reject NaN.
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise InputError(f"sampling temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not checks.is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"sampling top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"sampling top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise InputError(f"sampling min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not self.repetition_penalty > 0 or math.isinf(self.repetition_penalty):
            raise InputError(
                f"sampling repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}"
            )

    @classmethod
    def greedy(cls) -> "SamplingConfig":
        return cls(temperature=0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def apply_temperature(logits_BV: jax.Array, temperature: float) -> jax.Array:
    """Divides logits by temperature (> 0); below 1 sharpens, above 1 flattens."""
    return logits_BV / temperature


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits per row (k a static int >= 1, clipped to the vocab size).

    Like transformers, every logit equal to the k-th largest is kept, so ties can keep more than k tokens.
    """
    k = min(k, logits_BV.shape[-1])
    kth_largest_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV < kth_largest_B1, FILTERED, logits_BV)


def top_p_filter(logits_BV: jax.Array, p: float) -> jax.Array:
    """Nucleus filter: keeps the smallest set of most likely tokens whose probability mass reaches p, in (0, 1].

    Follows transformers' arithmetic (ascending sort, cumulative softmax, drop while the mass so far <= 1 - p,
    always keep the top token). The kept tokens are those at or above a threshold logit, so on ties at the
    threshold all tied tokens are kept, where transformers keeps whichever its sort puts last.
    """
    sorted_BV = jnp.sort(logits_BV, axis=-1)
    cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # The mass so far only grows along the sorted axis, so the removed tokens are a prefix of it.
    remove_BV = (cumulative_BV <= 1 - p).at[:, -1].set(False)
    num_removed_B1 = jnp.sum(remove_BV, axis=-1, keepdims=True)
    threshold_B1 = jnp.take_along_axis(sorted_BV, num_removed_B1, axis=-1)
    return jnp.where(logits_BV < threshold_B1, FILTERED, logits_BV)


def min_p_filter(logits_BV: jax.Array, min_p: float) -> jax.Array:
    """Drops tokens whose probability is below min_p (in [0, 1]) times the top token's probability."""
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    # min_p <= 1, so the top token always passes: no separate keep-at-least-one rule is needed.
    threshold_B1 = min_p * jnp.max(probs_BV, axis=-1, keepdims=True)
    return jnp.where(probs_BV < threshold_B1, FILTERED, logits_BV)


def repetition_penalty(
    logits_BV: jax.Array,
    previous_tokens_BT: jax.Array,
    penalty: float,
    valid_BT: jax.Array | None = None,
) -> jax.Array:
    """Penalises every token that appears in its row's previous tokens, once however often it appeared.

    transformers' rule (CTRL paper): a seen token's logit becomes logit / penalty if positive, else logit * penalty,
    so penalty > 1 discourages repeats and penalty < 1 encourages them. Positions where `valid_BT` is False
    (padding, cache slots not yet written) and token ids outside [0, V) are ignored.
    """
    batch, vocab = logits_BV.shape
    counted_BT = (previous_tokens_BT >= 0) & (previous_tokens_BT < vocab)
    if valid_BT is not None:
        counted_BT &= valid_BT
    # Ignored positions point one past the vocab, and mode="drop" discards those writes.
    token_ids_BT = jnp.where(counted_BT, previous_tokens_BT, vocab)
    rows_B1 = jnp.arange(batch)[:, None]
    seen_BV = jnp.zeros((batch, vocab), bool).at[rows_B1, token_ids_BT].set(True, mode="drop")
    penalised_BV = jnp.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
    return jnp.where(seen_BV, penalised_BV, logits_BV)


def process_logits(
    logits_BV: jax.Array,
    config: SamplingConfig,
    previous_tokens_BT: jax.Array | None = None,
    valid_BT: jax.Array | None = None,
) -> jax.Array:
    """Applies the rules `config` switches on, in transformers' `generate` order, as float32.

    Order: repetition penalty, temperature, top-k, top-p, min-p (so min-p sees temperature-scaled probabilities).
    A greedy config applies only the repetition penalty, as `generate` does without sampling: the other rules
    never change the argmax.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if config.repetition_penalty != 1 and previous_tokens_BT is not None:
        logits_BV = repetition_penalty(logits_BV, previous_tokens_BT, config.repetition_penalty, valid_BT)
    if config.is_greedy:
        return logits_BV
    if config.temperature != 1:
        logits_BV = apply_temperature(logits_BV, config.temperature)
    if config.top_k > 0:
        logits_BV = top_k_filter(logits_BV, config.top_k)
    if config.top_p < 1:
        logits_BV = top_p_filter(logits_BV, config.top_p)
    if config.min_p > 0:
        logits_BV = min_p_filter(logits_BV, config.min_p)
    return logits_BV


def sample(
    rng: jax.Array,
    logits_BV: jax.Array,
    config: SamplingConfig,
    previous_tokens_BT: jax.Array | None = None,
    valid_BT: jax.Array | None = None,
) -> jax.Array:
    """Returns one int32 token per row: argmax when greedy, else a draw from the processed distribution.

    Row b draws with fold_in(rng, b), b being its index in the global batch, so its token depends only on
    (rng, b, its logits) and not on the batch's sharding or the device count. Jit with `config` static.
    """
    logits_BV = process_logits(logits_BV, config, previous_tokens_BT, valid_BT)
    if config.is_greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    row_keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(logits_BV.shape[0]))
    return jax.vmap(jax.random.categorical)(row_keys_B, logits_BV).astype(jnp.int32)


def log_probs(logits_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """Log-probability of each row's token under the model's RAW logits, before any sampling rule.

    Raw rather than processed: this is the model's own score (for perplexity, speculative acceptance, draft
    ranking), and it stays finite for tokens a filter would have removed.
    """
    log_probs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs_BV, tokens_B[:, None].astype(jnp.int32), axis=-1)[:, 0]
