"""Superposed Decoding (Shen et al., 2024, RAIVNLab/SuperposedDecoding): k drafts from one forward pass per step.

Each prompt keeps ONE cache row. At every step the model sees a single superposed input, sum_d gamma_d E[last token of
draft d] with gamma = softmax of the drafts' cumulative scores, and its one next-token distribution is shared by all
drafts; the drafts differ through an n-gram model that conditions on each draft's own history:

  p = softmax(logits / temperature) in float32; p_hat = its top m tokens, renormalised   (m = 3k in the reference)
  s_d(v) = (1 - alpha) log p_hat(v) + alpha log p_ngram(v | draft d)    (-inf where p_hat(v) is 0 or the n-grams never
           saw v there; (1 - alpha) log p_hat(v) - penalty for a draft none of whose candidates is finite)
  S(d, v) = score_d + s_d(v); the top 2k (draft, token) pairs refill the pools: stop-token ones merge into the top k
  finished, the top k others become the new alive drafts (on the first step all drafts are draft 0, whose score is 0
  while the empty slots start at -inf, so the top 2k come from draft 0 alone, as in the reference).

As in the reference, p is a float32 probability: at temperature 0.06 a token more than ~6.2 logits below the top
rounds to 0, so no n-gram support can bring it back (config.log_space_candidates keeps every top-m token finite
instead). alpha, temperature and m left at REFERENCE take the reference's tuned values for k (REFERENCE_PARAMS).
alpha = 0 is the reference's `smoothing=None` (LM only): no n-gram lookups and no pruning, so no store is needed.
Decoding is deterministic. The output merges alive and finished drafts and sorts them by score per token (the
reference's "lowest perplexity first", ppl = exp(-score / length), the stop token counted in the length).

  sampler = Sampler(model, params, tokenizer, SamplerConfig(max_new_tokens=10, stop_tokens=(eos,)),
                    strategy=Superposed(SuperposedConfig(num_drafts=3), store=ngram_store.load_ngram_store(path)))
  output = sampler.generate_tokens(prompt_ids)   # the reference's prompts start with BOS where the tokenizer adds one
  output.text[0]  # up to k distinct drafts of the first prompt, best first; output.tokens, output.scores alike

It is a strategy of the decode engine (samplers/engine.py), which does the prompts, padding, prefill, sharding and
the loop; the token budget and stop tokens are the engine's (SamplerConfig). Drafts are rewritten every step, so
the strategy emits no tokens into the engine's buffer: its output is read from its own state.
"""

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from errors import InputError, checks
from models.cache import Cache
from samplers import ngram_store, stopping
from samplers.strategy import Context, Emitted, Prefill, Strategy

# The reference's tuned settings per number of drafts k, from its params/p15_d{k}_mixed.json (15-token prompts):
# k -> (alpha, temperature). Every file has m = 3k candidates; a k without a file takes k = 3's alpha and temperature.
REFERENCE_PARAMS = {2: (0.62, 0.06), 3: (0.54, 0.06), 4: (0.52, 0.06), 5: (0.60, 0.06), 6: (0.52, 0.06),
                    10: (0.54, 0.12)}
REFERENCE = -1  # alpha, temperature or num_candidates left at this take REFERENCE_PARAMS' value for num_drafts
# log(2^-150): a float32 probability below half the smallest subnormal (2^-149) rounds to 0.
_LOG_FLOAT32_ZERO = -150 * math.log(2)


@dataclasses.dataclass(frozen=True)
class SuperposedConfig:
    """Superposed Decoding's settings (static under jit); defaults are the reference's params file for num_drafts.

    alpha, temperature and num_candidates (m) at REFERENCE (-1) are REFERENCE_PARAMS[num_drafts]'s; `resolved()`
    fills them in. ngram_weights pair with ngram_orders and are used as given (the reference's sum to 0.5,
    unnormalised). The token budget, stop tokens, buckets and cache length are the engine's (SamplerConfig).
    """

    num_drafts: int = 3
    num_candidates: int = REFERENCE  # m, candidate tokens per step
    alpha: float = float(REFERENCE)  # a float, so that the config field built from it takes float overrides
    temperature: float = float(REFERENCE)
    ngram_orders: tuple[int, ...] = ngram_store.DEFAULT_ORDERS
    ngram_weights: tuple[float, ...] = ngram_store.REFERENCE_WEIGHTS
    no_support_penalty: float = 200.0
    # True: candidates by log_softmax(logits / T), finite for every top-m token, so the n-gram term can pick a token
    # whose float32 probability is 0 and which the reference never scores (decodelab's earlier variant).
    log_space_candidates: bool = False

    def __post_init__(self):
        for name in ("ngram_orders", "ngram_weights"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists would make the config unhashable
        k = self.num_drafts
        if not checks.is_int(k) or k < 1:
            raise InputError(f"superposed.num_drafts (k) must be an integer >= 1, got {k!r}")
        m = self.num_candidates
        if not checks.is_int(m) or (m != REFERENCE and m < k):
            raise InputError(f"superposed.num_candidates (m) must be {REFERENCE} (the reference's: 3k) or an "
                             f"integer >= num_drafts={k}, got {m!r}")
        if not (0 <= self.alpha <= 1 or self.alpha == REFERENCE):
            raise InputError(f"superposed.alpha must be in [0, 1] or {REFERENCE} (the reference's for num_drafts), "
                             f"got {self.alpha}")
        if not (0 < self.temperature < math.inf or self.temperature == REFERENCE):
            raise InputError(f"superposed.temperature must be a finite number > 0 or {REFERENCE} (the reference's "
                             f"for num_drafts), got {self.temperature}")
        orders = self.ngram_orders
        if (not orders or not all(checks.is_int(n) for n in orders) or list(orders) != sorted(set(orders))
                or orders[0] < 2):
            raise InputError(f"superposed.ngram_orders must be distinct increasing integers >= 2, got {orders}")
        if len(self.ngram_weights) != len(orders):
            raise InputError(f"superposed.ngram_weights has {len(self.ngram_weights)} values for "
                             f"{len(orders)} ngram_orders {orders}; give one weight per order")
        if any(not 0 <= w < math.inf for w in self.ngram_weights) or (self.alpha != 0 and not sum(self.ngram_weights)):
            raise InputError(f"superposed.ngram_weights must be finite, >= 0 and not all 0, got {self.ngram_weights}")
        if not 0 <= self.no_support_penalty < math.inf:
            raise InputError(
                f"superposed.no_support_penalty must be a finite number >= 0, got {self.no_support_penalty}")
        if not isinstance(self.log_space_candidates, bool):
            raise InputError(
                f"superposed.log_space_candidates must be True or False, got {self.log_space_candidates!r}")

    def resolved(self) -> "SuperposedConfig":
        """This config with alpha, temperature and num_candidates at REFERENCE replaced by REFERENCE_PARAMS'."""
        k = self.num_drafts
        alpha, temperature = REFERENCE_PARAMS.get(k, REFERENCE_PARAMS[3])
        given = lambda value, default: default if value == REFERENCE else value
        return dataclasses.replace(self, alpha=given(self.alpha, alpha),
                                   temperature=given(self.temperature, temperature),
                                   num_candidates=given(self.num_candidates, 3 * k))


@flax.struct.dataclass
class SuperposedState:
    """What the decode loop carries. Draft slots with score -inf are empty; tokens after a draft's end are MASKED."""

    step: jax.Array  # int32 scalar: tokens chosen so far
    prompt_BP: jax.Array  # right-padded prompts, the start of every draft's n-gram history
    lengths_B: jax.Array
    alive_BDN: jax.Array  # the k alive drafts' new tokens
    alive_score_BD: jax.Array  # their cumulative interpolated scores
    finished_BDN: jax.Array  # the k best drafts that ended in a stop token (stop token included)
    finished_score_BD: jax.Array
    cache: Cache  # one row per prompt, filled with superposed inputs after the prompt


@dataclasses.dataclass
class SuperposedOutput:
    """Per prompt, up to k distinct drafts sorted by score per token, best first: new tokens (stop token
    included), text (without it) and the cumulative interpolated score."""

    tokens: list[list[list[int]]]
    text: list[list[str]]
    scores: list[list[float]]


class Superposed(Strategy):
    """Superposed Decoding as a strategy of the decode engine.

    store: an `ngram_store.NgramStore` holding every order of config.ngram_orders; needed when alpha > 0. It is put on
    the device(s) once (`prepare`) and reaches the jitted step as ctx.constants. self.config is `config.resolved()`.
    """

    tokens_per_step = 0
    done_reason = "drafts_done"

    def __init__(self, config: SuperposedConfig = SuperposedConfig(), store=None):
        self.config, self.store = config.resolved(), store

    def prepare(self, sampler):
        cfg, store = self.config, self.store
        if cfg.alpha == 0:
            return None
        if store is None:
            raise InputError(f"superposed.alpha={cfg.alpha} > 0 needs an n-gram store (superposed.ngram_store); "
                             f"build it with: {ngram_store.BUILD_COMMAND}")
        missing = sorted(set(cfg.ngram_orders) - set(store.orders))
        if missing:
            raise InputError(f"superposed.ngram_orders {cfg.ngram_orders}: the n-gram store has orders "
                             f"{store.orders}, not {missing}; rebuild it with: {ngram_store.BUILD_COMMAND}")
        if store.vocab_size > sampler.model.config.vocab_size:
            raise InputError(f"superposed.ngram_store was built for a vocabulary of {store.vocab_size} tokens, more "
                             f"than the model's {sampler.model.config.vocab_size}; it is from another tokenizer")
        return sampler.place_replicated(store)

    def _weights(self, store) -> tuple[float, ...]:
        """One weight per order of the store; orders the store has but the config leaves out weigh 0."""
        weight_of = dict(zip(self.config.ngram_orders, self.config.ngram_weights))
        return tuple(weight_of.get(n, 0.0) for n in store.orders)

    def init(self, ctx: Context, prefill: Prefill):
        """The drafts' first tokens, chosen from the last prompt position."""
        batch = prefill.prompt_BP.shape[0]
        k, N = self.config.num_drafts, ctx.tokens_BN.shape[1]
        # Only draft 0 exists at first; padded batch rows start with no draft at all.
        first_score_BD = jnp.where((jnp.arange(k) == 0)[None] & ctx.active_B[:, None], 0.0, -jnp.inf)
        state = SuperposedState(
            step=jnp.zeros((), jnp.int32),
            prompt_BP=prefill.prompt_BP,
            lengths_B=prefill.lengths_B,
            alive_BDN=jnp.full((batch, k, N), stopping.MASKED, jnp.int32),
            alive_score_BD=first_score_BD.astype(jnp.float32),
            finished_BDN=jnp.full((batch, k, N), stopping.MASKED, jnp.int32),
            finished_score_BD=jnp.full((batch, k), -jnp.inf, jnp.float32),
            cache=prefill.cache,
        )
        return self._select(ctx, state, prefill.logits_BV), _nothing(batch)

    def step(self, ctx: Context, state: SuperposedState):
        """Feeds each prompt's superposed input and chooses the next token of its drafts."""
        last_BD = jax.lax.dynamic_index_in_dim(state.alive_BDN, state.step - 1, axis=2, keepdims=False)
        # With no finite score left (a prompt whose drafts all finished) any weights do; avoid softmax's NaN.
        scores_BD = state.alive_score_BD
        gamma_BD = jax.nn.softmax(jnp.where(jnp.isfinite(scores_BD).any(-1, keepdims=True), scores_BD, 0.0))
        logits_B1V, cache = ctx.forward(last_BD[:, None, :], state.cache, ctx.active_B.astype(jnp.int32),
                                        token_weights_BTK=gamma_BD[:, None, :])
        selected = self._select(ctx, state.replace(cache=cache), logits_B1V[:, 0])
        # Rows that are done keep their drafts as they are.
        keep = lambda new, old: jnp.where(ctx.active_B.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        pools = ("alive_BDN", "alive_score_BD", "finished_BDN", "finished_score_BD")
        return selected.replace(**{name: keep(getattr(selected, name), getattr(state, name)) for name in pools}), \
            _nothing(state.prompt_BP.shape[0])

    def is_done(self, ctx: Context, state: SuperposedState) -> jax.Array:
        """A prompt is done when none of its drafts is alive, at the token budget, or when its cache is full."""
        return (~jnp.isfinite(state.alive_score_BD).any(-1) | (state.step >= ctx.max_new_tokens)
                | ~state.cache.has_room(1))

    def output(self, sampler, state, num_prompts: int) -> SuperposedOutput:
        """Alive and finished drafts of the first `num_prompts` prompts, merged, deduplicated and sorted."""
        drafts = state.strategy
        fetch = lambda x: sampler.fetch(x)[:num_prompts]
        tokens_BCN = np.concatenate([fetch(drafts.alive_BDN), fetch(drafts.finished_BDN)], axis=1)
        scores_BC = np.concatenate([fetch(drafts.alive_score_BD), fetch(drafts.finished_score_BD)], axis=1)
        stop_tokens, k = set(sampler.config.stop_tokens), self.config.num_drafts
        output = SuperposedOutput([], [], [])
        for row_tokens, row_scores in zip(tokens_BCN, scores_BC):
            unique = {}
            for tokens, score in zip(row_tokens, row_scores):
                tokens = tuple(t for t in tokens.tolist() if t != stopping.MASKED)
                if np.isfinite(score) and tokens:
                    unique[tokens] = max(float(score), unique.get(tokens, -math.inf))
            best = sorted(unique.items(), key=lambda item: -item[1] / len(item[0]))[:k]
            output.tokens.append([list(tokens) for tokens, _ in best])
            output.scores.append([score for _, score in best])
            text_tokens = [tokens[:-1] if tokens[-1] in stop_tokens else tokens for tokens, _ in best]
            output.text.append([sampler.tokenizer.decode(list(t)) if sampler.tokenizer is not None else ""
                                for t in text_tokens])
        return output

    def _select(self, ctx: Context, state: SuperposedState, logits_BV) -> SuperposedState:
        """Scores the k x m (draft, candidate) pairs, refills the alive and finished pools, and advances a step."""
        cfg = self.config
        k, M, alpha = cfg.num_drafts, cfg.num_candidates, cfg.alpha
        B = logits_BV.shape[0]
        lm_BM, candidates_BM = candidates(cfg, logits_BV)
        if alpha > 0:
            store = ctx.constants
            history_BDW, history_len_BD = _recent_tokens(state, store)
            candidates_BDM = jnp.broadcast_to(candidates_BM[:, None], (B, k, M))
            ngram_BDM, supported_BDM = ngram_store.ngram_log_probs(store, history_BDW, history_len_BD,
                                                                   candidates_BDM, self._weights(store))
            mixed_BDM = jnp.where(supported_BDM, (1 - alpha) * lm_BM[:, None] + alpha * ngram_BDM, -jnp.inf)
            fallback_BDM = jnp.broadcast_to((1 - alpha) * lm_BM[:, None] - cfg.no_support_penalty, (B, k, M))
            # The reference falls back where no candidate is finite: also where the n-grams support only tokens
            # of probability 0.
            step_BDM = jnp.where(jnp.isfinite(mixed_BDM).any(-1, keepdims=True), mixed_BDM, fallback_BDM)
        else:
            step_BDM = jnp.broadcast_to(lm_BM[:, None], (B, k, M))
        scores_BF = (state.alive_score_BD[:, :, None] + step_BDM).reshape(B, k * M)

        num_grown = min(2 * k, k * M)  # 2k, so k alive drafts remain even if k of them end in a stop token
        grown_score_BG, flat_BG = jax.lax.top_k(scores_BF, num_grown)
        parent_BG, token_BG = flat_BG // M, jnp.take_along_axis(candidates_BM, flat_BG % M, axis=1)
        grown_BGN = jnp.take_along_axis(state.alive_BDN, parent_BG[:, :, None], axis=1)
        grown_BGN = jax.lax.dynamic_update_index_in_dim(grown_BGN, token_BG, state.step, axis=2)
        stop_BG = stopping.is_stop_token(token_BG, ctx.stop_tokens)

        alive_score_BD, alive_BD = jax.lax.top_k(jnp.where(stop_BG, -jnp.inf, grown_score_BG), k)
        pool_score_BC = jnp.concatenate([state.finished_score_BD, jnp.where(stop_BG, grown_score_BG, -jnp.inf)], 1)
        pool_BCN = jnp.concatenate([state.finished_BDN, grown_BGN], axis=1)
        finished_score_BD, finished_BD = jax.lax.top_k(pool_score_BC, k)
        return state.replace(
            step=state.step + 1,
            alive_BDN=jnp.take_along_axis(grown_BGN, alive_BD[:, :, None], axis=1),
            alive_score_BD=alive_score_BD,
            finished_BDN=jnp.take_along_axis(pool_BCN, finished_BD[:, :, None], axis=1),
            finished_score_BD=finished_score_BD,
        )


def candidates(config: SuperposedConfig, logits_BV) -> tuple[jax.Array, jax.Array]:
    """(log p_hat_BM, candidates_BM): the top m tokens of softmax(logits / T) (a resolved config's m and T) and their
    log-probabilities renormalised over the m.

    The reference renormalises float32 probabilities, so a token whose probability rounds to 0 gets log 0 = -inf.
    They are computed from log_softmax here, zero where it is below log(2^-150), because XLA on CPU flushes float32
    subnormals to 0 while the reference (torch on CUDA) and numpy keep them: exp would drop tokens 5.2 to 6.2 logits
    below the top at T = 0.06 that the reference keeps (with log p of -90 to -104)."""
    log_p_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / config.temperature, axis=-1)
    top_BM, candidates_BM = jax.lax.top_k(log_p_BV, config.num_candidates)
    if not config.log_space_candidates:
        top_BM = jnp.where(top_BM < _LOG_FLOAT32_ZERO, -jnp.inf, top_BM)
    return top_BM - jax.nn.logsumexp(top_BM, axis=-1, keepdims=True), candidates_BM


def _nothing(batch: int) -> Emitted:
    """Drafts are rewritten every step, so nothing goes into the engine's append-only token buffer."""
    return Emitted(jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0), jnp.float32), jnp.zeros((batch,), jnp.int32))


def _recent_tokens(state: SuperposedState, store) -> tuple[jax.Array, jax.Array]:
    """Each draft's last W = (largest store order - 1) tokens of prompt + new tokens, left-aligned as
    `ngram_log_probs` reads them, and how many of the W are real (fewer only for a short history)."""
    W = store.orders[-1] - 1
    B, P = state.prompt_BP.shape
    k, N = state.alive_BDN.shape[1:]
    total_B = state.lengths_B + state.step
    history_len_B = jnp.minimum(total_B, W)
    position_BW = (total_B - history_len_B)[:, None] + jnp.arange(W)[None]  # past history_len_B: never read
    prompt_BW = jnp.take_along_axis(state.prompt_BP, jnp.clip(position_BW, 0, P - 1), axis=1)
    new_index_BDW = jnp.broadcast_to(jnp.clip(position_BW - state.lengths_B[:, None], 0, N - 1)[:, None],
                                     (B, k, W))
    new_BDW = jnp.take_along_axis(state.alive_BDN, new_index_BDW, axis=2)
    in_prompt_B1W = (position_BW < state.lengths_B[:, None])[:, None]
    history_BDW = jnp.where(in_prompt_B1W, prompt_BW[:, None], new_BDW)
    return history_BDW, jnp.broadcast_to(history_len_B[:, None], (B, k))
