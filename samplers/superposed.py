"""Superposed Decoding (Shen et al., 2024, RAIVNLab/SuperposedDecoding): k drafts from one forward pass per step.

Each prompt keeps ONE cache row. At every step the model sees a single superposed input, sum_d gamma_d E[last token of
draft d] with gamma = softmax of the drafts' cumulative scores, and its one next-token distribution is shared by all
drafts; the drafts differ through an n-gram model that conditions on each draft's own history:

  p_hat = softmax(logits / temperature), cut to its top m tokens and renormalised  (m = 3k unless set)
  s_d(v) = (1 - alpha) log p_hat(v) + alpha log p_ngram(v | draft d)    (-inf where the n-grams never saw v there;
           (1 - alpha) log p_hat(v) - penalty for a draft none of whose candidates they saw)
  S(d, v) = score_d + s_d(v); the top 2k (draft, token) pairs refill the pools: stop-token ones merge into the top k
  finished, the top k others become the new alive drafts (on the first step all drafts are draft 0, whose score is 0
  while the empty slots start at -inf, so the top 2k come from draft 0 alone, as in the reference).

alpha = 0 is the reference's `smoothing=None` (LM only): no n-gram lookups and no pruning, so no store is needed.
Decoding is deterministic. The output merges alive and finished drafts and sorts them by score per token (the
reference's "lowest perplexity first", ppl = exp(-score / length), the stop token counted in the length).

  sampler = SuperposedSampler(model, params, tokenizer, SuperposedConfig(max_new_tokens=10, stop_tokens=(eos,)),
                              store=ngram_store.load_ngram_store(path))
  output = sampler.generate(["def fib(n):\n"])
  output.text[0]  # up to k distinct drafts of the first prompt, best first; output.tokens, output.scores alike

Prompt padding, buckets, parameter placement and sharding are the decode engine's (samplers/engine.py).
"""

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from errors import InputError
from models import kv_cache
from samplers import ngram_store, stopping
from samplers.engine import Sampler, SamplerConfig


@dataclasses.dataclass(frozen=True)
class SuperposedConfig:
    """Superposed Decoding's settings (static under jit); defaults are the reference's `p15_d3_mixed.json`.

    ngram_weights pair with ngram_orders and are used as given (the reference's sum to 0.5, unnormalised).
    prompt_buckets and cache_len are the engine's (SamplerConfig).
    """

    max_new_tokens: int = 10
    num_drafts: int = 3
    num_candidates: int = 0  # m, candidate tokens per step; 0 = 3 * num_drafts
    alpha: float = 0.54
    temperature: float = 0.06
    ngram_orders: tuple[int, ...] = ngram_store.DEFAULT_ORDERS
    ngram_weights: tuple[float, ...] = ngram_store.REFERENCE_WEIGHTS
    no_support_penalty: float = 200.0
    stop_tokens: tuple[int, ...] = ()
    prompt_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    cache_len: int = 0

    def __post_init__(self):
        for name in ("ngram_orders", "ngram_weights", "stop_tokens", "prompt_buckets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists would make the config unhashable
        k, m = self.num_drafts, self.num_candidates
        if not _is_int(k) or k < 1:
            raise InputError(f"superposed.num_drafts (k) must be an integer >= 1, got {k!r}")
        if not _is_int(m) or (m != 0 and m < k):
            raise InputError(f"superposed.num_candidates (m) must be 0 (= 3k) or an integer >= num_drafts={k}, "
                             f"got {m!r}")
        if not 0 <= self.alpha <= 1:
            raise InputError(f"superposed.alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0 or math.isinf(self.temperature):
            raise InputError(f"superposed.temperature must be a finite number > 0, got {self.temperature}")
        orders = self.ngram_orders
        if not orders or any(not _is_int(n) for n in orders) or list(orders) != sorted(set(orders)) or orders[0] < 2:
            raise InputError(f"superposed.ngram_orders must be distinct increasing integers >= 2, got {orders}")
        if len(self.ngram_weights) != len(orders):
            raise InputError(f"superposed.ngram_weights has {len(self.ngram_weights)} values for "
                             f"{len(orders)} ngram_orders {orders}; give one weight per order")
        if any(not 0 <= w < math.inf for w in self.ngram_weights) or (self.alpha > 0 and not sum(self.ngram_weights)):
            raise InputError(f"superposed.ngram_weights must be finite, >= 0 and not all 0, got {self.ngram_weights}")
        if not 0 <= self.no_support_penalty < math.inf:
            raise InputError(
                f"superposed.no_support_penalty must be a finite number >= 0, got {self.no_support_penalty}")
        # The engine checks max_new_tokens, stop_tokens, prompt_buckets and cache_len, and sorts the buckets.
        object.__setattr__(self, "prompt_buckets", self.engine_config.prompt_buckets)

    @property
    def m(self) -> int:
        return self.num_candidates or 3 * self.num_drafts

    @property
    def engine_config(self) -> SamplerConfig:
        return SamplerConfig(max_new_tokens=self.max_new_tokens, cache_len=self.cache_len,
                             prompt_buckets=self.prompt_buckets, stop_tokens=self.stop_tokens)


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
    cache: kv_cache.Cache  # one row per prompt, filled with superposed inputs after the prompt


@dataclasses.dataclass
class SuperposedOutput:
    """Per prompt, up to k distinct drafts sorted by score per token, best first: new tokens (stop token
    included), text (without it) and the cumulative interpolated score."""

    tokens: list[list[list[int]]]
    text: list[list[str]]
    scores: list[list[float]]


class SuperposedSampler:
    """Superposed Decoding with `model` (a models/ Linen module with `init_cache`) and `params`.

    store: an `ngram_store.NgramStore` holding every order of config.ngram_orders; needed when alpha > 0. It is put on
    the device(s) once and passed to the jitted functions as an argument. mesh/rules: as the engine's.
    """

    def __init__(self, model, params, tokenizer, config: SuperposedConfig, *, store=None, mesh=None, rules=None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.engine = Sampler(model, params, tokenizer, config.engine_config, mesh=mesh, rules=rules)
        self.trace_count = 0
        if config.alpha > 0:
            if store is None:
                raise InputError(f"superposed.alpha={config.alpha} > 0 needs an n-gram store "
                                 f"(superposed.ngram_store); build it with: {ngram_store.BUILD_COMMAND}")
            missing = sorted(set(config.ngram_orders) - set(store.orders))
            if missing:
                raise InputError(f"superposed.ngram_orders {config.ngram_orders}: the n-gram store has orders "
                                 f"{store.orders}, not {missing}; rebuild it with: {ngram_store.BUILD_COMMAND}")
            if store.vocab_size > model.config.vocab_size:
                raise InputError(f"superposed.ngram_store was built for a vocabulary of {store.vocab_size} tokens, "
                                 f"more than the model's {model.config.vocab_size}; it is from another tokenizer")
            # Orders the store has but the config leaves out weigh 0.
            weight_of = dict(zip(config.ngram_orders, config.ngram_weights))
            self._weights = tuple(weight_of.get(n, 0.0) for n in store.orders)
            replicated = None if mesh is None else NamedSharding(mesh, P())
            self.store = jax.device_put(store, replicated)
        else:
            self.store = None
        jit_kwargs = {}
        if mesh is not None:
            jit_kwargs["out_shardings"] = self.state_shardings()
        self._prefill = jax.jit(self._prefill_fn, static_argnames="cache_len", **jit_kwargs)
        self._decode = jax.jit(self._decode_fn, donate_argnames="state", **jit_kwargs)

    # ---------------------------------------------------------------------------------------------------------
    # Host side.
    # ---------------------------------------------------------------------------------------------------------

    def generate(self, prompts: list[str]) -> SuperposedOutput:
        """k drafts completing each prompt (tokenized without special tokens)."""
        if self.tokenizer is None:
            raise InputError("SuperposedSampler.generate needs a tokenizer; pass one or call generate_tokens")
        if isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts):
            raise InputError("SuperposedSampler.generate: prompts must be a list of non-empty strings")
        return self.generate_tokens([self.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts])

    def generate_tokens(self, prompt_tokens: list[list[int]]) -> SuperposedOutput:
        """k drafts completing each prompt given as token ids."""
        return self.output(self.decode(self.prefill(prompt_tokens)), len(prompt_tokens))

    def prefill(self, prompt_tokens: list[list[int]]) -> SuperposedState:
        """The state after the prompts are in the cache and the first token of the drafts is chosen."""
        prompt_BP, lengths_B, cache_len = self.engine.pad_prompts(prompt_tokens)
        live_B = np.arange(len(lengths_B)) < len(prompt_tokens)
        with self.engine.sharding_context():
            return self._prefill(self.engine.params, *self.engine.put_batch(prompt_BP, lengths_B, live_B),
                                 self.store, cache_len=cache_len)

    def decode(self, state: SuperposedState) -> SuperposedState:
        """Runs the decode loop to the end; `state` is donated."""
        with self.engine.sharding_context():
            return self._decode(self.engine.params, state, self.store)

    def output(self, state: SuperposedState, num_prompts: int) -> SuperposedOutput:
        """Alive and finished drafts of the first `num_prompts` prompts, merged, deduplicated and sorted."""
        fetch = lambda x: self.engine.fetch(x)[:num_prompts]
        tokens_BCN = np.concatenate([fetch(state.alive_BDN), fetch(state.finished_BDN)], axis=1)
        scores_BC = np.concatenate([fetch(state.alive_score_BD), fetch(state.finished_score_BD)], axis=1)
        stop_tokens, k = set(self.config.stop_tokens), self.config.num_drafts
        output = SuperposedOutput([], [], [])
        for row_tokens, row_scores in zip(tokens_BCN, scores_BC):
            drafts = {}
            for tokens, score in zip(row_tokens, row_scores):
                tokens = tuple(t for t in tokens.tolist() if t != stopping.MASKED)
                if np.isfinite(score) and tokens:
                    drafts[tokens] = max(float(score), drafts.get(tokens, -math.inf))
            best = sorted(drafts.items(), key=lambda item: -item[1] / len(item[0]))[:k]
            output.tokens.append([list(tokens) for tokens, _ in best])
            output.scores.append([score for _, score in best])
            text_tokens = [tokens[:-1] if tokens[-1] in stop_tokens else tokens for tokens, _ in best]
            output.text.append([self.tokenizer.decode(list(t)) if self.tokenizer is not None else ""
                                for t in text_tokens])
        return output

    def state_shardings(self) -> SuperposedState:
        """Batch-major arrays over the data-parallel axes, the cache by its logical axes, the step replicated."""
        engine = self.engine.state_shardings()
        batch = engine.tokens_BN
        return SuperposedState(step=engine.step, prompt_BP=batch, lengths_B=batch, alive_BDN=batch,
                               alive_score_BD=batch, finished_BDN=batch, finished_score_BD=batch, cache=engine.cache)

    # ---------------------------------------------------------------------------------------------------------
    # Device side.
    # ---------------------------------------------------------------------------------------------------------

    def _prefill_fn(self, params, prompt_BP, lengths_B, live_B, store, *, cache_len: int) -> SuperposedState:
        """Writes the prompts into a fresh cache and chooses the drafts' first tokens from the last prompt position."""
        self.trace_count += 1  # runs only while tracing
        batch = prompt_BP.shape[0]
        k, N = self.config.num_drafts, self.config.max_new_tokens
        cache = self.model.init_cache(batch, cache_len)
        logits_B1V, cache = self.model.apply({"params": params}, prompt_BP, cache, lengths_B,
                                             logits_at_B=lengths_B - 1)
        # Only draft 0 exists at first; padded batch rows start with no draft at all.
        first_score_BD = jnp.where((jnp.arange(k) == 0)[None] & live_B[:, None], 0.0, -jnp.inf)
        state = SuperposedState(
            step=jnp.zeros((), jnp.int32),
            prompt_BP=prompt_BP,
            lengths_B=lengths_B,
            alive_BDN=jnp.full((batch, k, N), stopping.MASKED, jnp.int32),
            alive_score_BD=first_score_BD.astype(jnp.float32),
            finished_BDN=jnp.full((batch, k, N), stopping.MASKED, jnp.int32),
            finished_score_BD=jnp.full((batch, k), -jnp.inf, jnp.float32),
            cache=cache,
        )
        return self._select(state, logits_B1V[:, 0], store)

    def _decode_fn(self, params, state: SuperposedState, store) -> SuperposedState:
        """Feeds each prompt's superposed input and chooses the next token of its drafts, until max_new_tokens or
        until no prompt has an alive draft left."""
        self.trace_count += 1

        def cond(state):
            return (state.step < self.config.max_new_tokens) & jnp.any(jnp.isfinite(state.alive_score_BD))

        def body(state):
            last_BD = jax.lax.dynamic_index_in_dim(state.alive_BDN, state.step - 1, axis=2, keepdims=False)
            # With no finite score left (a prompt whose drafts all finished) any weights do; avoid softmax's NaN.
            scores_BD = state.alive_score_BD
            gamma_BD = jax.nn.softmax(jnp.where(jnp.isfinite(scores_BD).any(-1, keepdims=True), scores_BD, 0.0))
            logits_B1V, cache = self.model.apply({"params": params}, last_BD[:, None, :], state.cache,
                                                 token_weights_BTK=gamma_BD[:, None, :])
            return self._select(state.replace(cache=cache), logits_B1V[:, 0], store)

        return jax.lax.while_loop(cond, body, state)

    def _select(self, state: SuperposedState, logits_BV, store) -> SuperposedState:
        """Scores the k x m (draft, candidate) pairs, refills the alive and finished pools, and advances a step."""
        cfg = self.config
        k, M, alpha = cfg.num_drafts, cfg.m, cfg.alpha
        B = logits_BV.shape[0]
        top_BM, candidates_BM = jax.lax.top_k(jax.nn.log_softmax(logits_BV / cfg.temperature, axis=-1), M)
        lm_BM = top_BM - jax.nn.logsumexp(top_BM, axis=-1, keepdims=True)  # renormalised over the top m
        if alpha > 0:
            history_BDW, history_len_BD = self._recent_tokens(state, store)
            candidates_BDM = jnp.broadcast_to(candidates_BM[:, None], (B, k, M))
            ngram_BDM, supported_BDM = ngram_store.ngram_log_probs(store, history_BDW, history_len_BD,
                                                                   candidates_BDM, self._weights)
            mixed_BDM = jnp.where(supported_BDM, (1 - alpha) * lm_BM[:, None] + alpha * ngram_BDM, -jnp.inf)
            fallback_BDM = jnp.broadcast_to((1 - alpha) * lm_BM[:, None] - cfg.no_support_penalty, (B, k, M))
            step_BDM = jnp.where(supported_BDM.any(-1, keepdims=True), mixed_BDM, fallback_BDM)
        else:
            step_BDM = jnp.broadcast_to(lm_BM[:, None], (B, k, M))
        scores_BF = (state.alive_score_BD[:, :, None] + step_BDM).reshape(B, k * M)

        num_grown = min(2 * k, k * M)  # 2k, so k alive drafts remain even if k of them end in a stop token
        grown_score_BG, flat_BG = jax.lax.top_k(scores_BF, num_grown)
        parent_BG, token_BG = flat_BG // M, jnp.take_along_axis(candidates_BM, flat_BG % M, axis=1)
        grown_BGN = jnp.take_along_axis(state.alive_BDN, parent_BG[:, :, None], axis=1)
        grown_BGN = jax.lax.dynamic_update_index_in_dim(grown_BGN, token_BG, state.step, axis=2)
        stop_BG = (jnp.isin(token_BG, jnp.asarray(cfg.stop_tokens, jnp.int32)) if cfg.stop_tokens
                   else jnp.zeros_like(token_BG, bool))

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

    def _recent_tokens(self, state: SuperposedState, store) -> tuple[jax.Array, jax.Array]:
        """Each draft's last W = (largest store order - 1) tokens of prompt + new tokens, left-aligned as
        `ngram_log_probs` reads them, and how many of the W are real (fewer only for a short history)."""
        W = store.orders[-1] - 1
        B, P = state.prompt_BP.shape
        k, N = state.alive_BDN.shape[1:]
        total_B = state.lengths_B + state.step
        history_len_B = jnp.minimum(total_B, W)
        position_BW = (total_B - history_len_B)[:, None] + jnp.arange(W)  # past history_len_B: never read
        prompt_BW = jnp.take_along_axis(state.prompt_BP, jnp.clip(position_BW, 0, P - 1), axis=1)
        new_index_BDW = jnp.broadcast_to(jnp.clip(position_BW - state.lengths_B[:, None], 0, N - 1)[:, None],
                                         (B, k, W))
        new_BDW = jnp.take_along_axis(state.alive_BDN, new_index_BDW, axis=2)
        in_prompt_B1W = (position_BW < state.lengths_B[:, None])[:, None]
        history_BDW = jnp.where(in_prompt_B1W, prompt_BW[:, None], new_BDW)
        return history_BDW, jnp.broadcast_to(history_len_B[:, None], (B, k))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
