"""The decode engine: a jitted prefill and a jitted `lax.while_loop` decode over an explicit KV cache pytree.

As in the gemma sampler, the static configuration (cache length, token budget, prompt buckets, stop rules) lives in
a frozen `SamplerConfig`, apart from the array state (`SamplingState`) that the jitted functions carry:

  sampler = Sampler(model, params, tokenizer, SamplerConfig(max_new_tokens=64, stop_tokens=(eos,)), mesh=mesh,
                    rules=rules)
  output = sampler.generate(["def fib(n):", "import os"], seed=0)
  output.tokens, output.text, output.log_probs, output.stop_reason

Shapes are kept few so that new requests reuse compilations: prompts are right-padded to the smallest bucket that
holds the longest one, and the batch to the next power of two (and multiple of the data-parallel size). Every row
is sampled with `sampling.sample` on the global batch, so a seed gives the same tokens on any device count.
"""

import contextlib
import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from errors import InputError
from models import kv_cache
from parallel import mesh as mesh_lib
from samplers import sampling, stopping
from samplers.sampling import SamplingConfig

# Automatic cache lengths are rounded up to this, so nearby token budgets share a compilation.
CACHE_LEN_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """What to generate; frozen and hashable, the static half of the engine.

    cache_len 0 sizes the cache per prompt bucket: bucket + max_new_tokens, rounded up to a multiple of 128 and
    capped at the model's max_seq_len. A row stops at a stop token, at the end of a stop sequence (the text is cut
    before it), after max_new_tokens tokens, or when its cache is full.
    """

    max_new_tokens: int
    cache_len: int = 0
    prompt_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    stop_tokens: tuple[int, ...] = ()
    stop_sequences: tuple[str, ...] = ()
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    def __post_init__(self):
        for name in ("prompt_buckets", "stop_tokens", "stop_sequences"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists would make the config unhashable
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise InputError(f"SamplerConfig.max_new_tokens must be an integer > 0, got {self.max_new_tokens!r}")
        if not _is_int(self.cache_len) or self.cache_len < 0:
            raise InputError(f"SamplerConfig.cache_len must be an integer >= 0 (0 = automatic), got {self.cache_len!r}")
        if not self.prompt_buckets or any(not _is_int(b) or b <= 0 for b in self.prompt_buckets):
            raise InputError(f"SamplerConfig.prompt_buckets must be positive integers, got {self.prompt_buckets}")
        object.__setattr__(self, "prompt_buckets", tuple(sorted(set(self.prompt_buckets))))
        if any(not _is_int(t) or t < 0 for t in self.stop_tokens):
            raise InputError(f"SamplerConfig.stop_tokens must be token ids >= 0, got {self.stop_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop_sequences):
            raise InputError(f"SamplerConfig.stop_sequences must be non-empty strings, got {self.stop_sequences}")
        if not isinstance(self.sampling, SamplingConfig):
            raise InputError(f"SamplerConfig.sampling must be a SamplingConfig, got {type(self.sampling).__name__}")


@flax.struct.dataclass
class SamplingState:
    """The arrays the decode loop carries. Row b's new tokens are tokens_BN[b, :num_tokens_B[b]]; later entries
    are stopping.MASKED (log-prob 0). last_token_B is the newest token, not yet written to the cache."""

    step: jax.Array  # int32 scalar: new tokens sampled so far (the same for every row)
    tokens_BN: jax.Array
    log_probs_BN: jax.Array
    num_tokens_B: jax.Array
    done_B: jax.Array
    last_token_B: jax.Array
    prompt_BP: jax.Array  # prompt ids, padding as MASKED: the history the repetition penalty reads
    cache: kv_cache.Cache
    rng: jax.Array


@dataclasses.dataclass
class SamplerOutput:
    """Per prompt: new tokens (up to and including the stop token or the end of the stop sequence), their text
    (without the stop token's text and cut before any stop sequence), the model's log-prob of each token (raw
    logits), and why the row ended: "stop_token", "stop_sequence", "max_new_tokens" or "cache_full"."""

    tokens: list[list[int]]
    text: list[str]
    log_probs: list[list[float]]
    stop_reason: list[str]


class Sampler:
    """Generates from `model` (a models/ Linen module with `init_cache`) with `params`.

    tokenizer: a `tokenizers.Tokenizer`, needed by `generate` and stop sequences; `generate_tokens` works
    without one. mesh/rules: run sharded, the cache over (cache_batch, cache_heads) and params by their logical
    names; `trace_count` counts how often the jitted functions were traced (a new bucket or batch size traces).
    """

    def __init__(self, model, params, tokenizer, config: SamplerConfig, *, mesh=None, rules=None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.mesh, self.rules = mesh, rules
        vocab_size, max_seq_len = model.config.vocab_size, model.config.max_seq_len
        for token in config.stop_tokens:
            if token >= vocab_size:
                raise InputError(f"SamplerConfig.stop_tokens: {token} is outside the vocabulary [0, {vocab_size})")
        if config.cache_len > max_seq_len:
            raise InputError(
                f"SamplerConfig.cache_len={config.cache_len} exceeds the model's max_seq_len={max_seq_len}")
        if config.stop_sequences and tokenizer is None:
            raise InputError("SamplerConfig.stop_sequences need a tokenizer; pass one to Sampler")
        self._sequence_ids = stopping.stop_sequence_ids(tokenizer, config.stop_sequences) if tokenizer else ()
        self.trace_count = 0

        params = nn.meta.unbox(params)
        jit_kwargs = {}
        if mesh is not None:
            self._batch_axes = nn.logical_to_mesh_axes(("cache_batch",), rules)[0]
            self._data_parallel = math.prod(mesh.shape[a] for a in jax.tree.leaves(self._batch_axes))
            params = jax.device_put(params, mesh_lib.sharded_abstract_params(model, mesh, rules)[1])
            jit_kwargs["out_shardings"] = self.state_shardings()
        else:
            self._data_parallel = 1
        # The model casts each matrix to its compute dtype at every step; casting once instead halves the bytes a
        # bfloat16 decode step reads. Vectors (norm scales) stay float32, as the model uses them.
        dtype = jnp.dtype(model.config.dtype)
        params = jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 and x.dtype != dtype else x, params)
        self.params = params
        self._prefill = jax.jit(self._prefill_fn, static_argnames="cache_len", **jit_kwargs)
        self._decode = jax.jit(self._decode_fn, donate_argnames="state", **jit_kwargs)

    # ---------------------------------------------------------------------------------------------------------
    # Host side: validation, padding, output.
    # ---------------------------------------------------------------------------------------------------------

    def generate(self, prompts: list[str], *, seed: int = 0) -> SamplerOutput:
        """Completes each prompt (tokenized without special tokens)."""
        if self.tokenizer is None:
            raise InputError("Sampler.generate needs a tokenizer; pass one to Sampler or call generate_tokens")
        if isinstance(prompts, str):
            raise InputError("Sampler.generate: prompts must be a list of strings, got a single string")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise InputError(f"Sampler.generate: prompts[{i}] is empty or not a string: {prompt!r}")
        return self.generate_tokens(
            [self.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts], seed=seed)

    def generate_tokens(self, prompt_tokens: list[list[int]], *, seed: int = 0) -> SamplerOutput:
        """Completes each prompt given as token ids."""
        return self.output(self.decode(self.prefill(prompt_tokens, seed=seed)), len(prompt_tokens))

    def prefill(self, prompt_tokens: list[list[int]], *, seed: int = 0) -> SamplingState:
        """The state after the prompts are in the cache and each row's first token is sampled (batch padded)."""
        prompt_BP, lengths_B, cache_len = self.pad_prompts(prompt_tokens)
        live_B = np.arange(len(lengths_B)) < len(prompt_tokens)
        with self.sharding_context():
            return self._prefill(self.params, *self.put_batch(prompt_BP, lengths_B, live_B), jax.random.key(seed),
                                 cache_len=cache_len)

    def decode(self, state: SamplingState) -> SamplingState:
        """Runs the decode loop to the end; `state` is donated."""
        with self.sharding_context():
            return self._decode(self.params, state)

    def output(self, state: SamplingState, num_prompts: int) -> SamplerOutput:
        """The first `num_prompts` rows of a finished state as tokens, text, log-probs and stop reasons."""
        tokens_BN, log_probs_BN, num_tokens_B = (
            self.fetch(x)[:num_prompts] for x in (state.tokens_BN, state.log_probs_BN, state.num_tokens_B))
        stop_tokens, max_new = set(self.config.stop_tokens), self.config.max_new_tokens
        output = SamplerOutput([], [], [], [])
        for row_tokens, row_log_probs, n in zip(tokens_BN, log_probs_BN, num_tokens_B):
            tokens, log_probs = row_tokens[:n].tolist(), row_log_probs[:n].tolist()
            if tokens and tokens[-1] in stop_tokens:
                reason, text_tokens = "stop_token", tokens[:-1]
            else:
                reason, text_tokens = ("max_new_tokens" if n == max_new else "cache_full"), tokens
            text = self.tokenizer.decode(text_tokens) if self.tokenizer is not None else ""
            cut = stopping.cut_at_stop_sequence(self.tokenizer, text_tokens, text, self.config.stop_sequences)
            if cut is not None:
                (tokens, text), reason = cut, "stop_sequence"
                log_probs = log_probs[:len(tokens)]
            output.tokens.append(tokens)
            output.text.append(text)
            output.log_probs.append(log_probs)
            output.stop_reason.append(reason)
        return output

    def pad_prompts(self, prompt_tokens):
        """Prompts right-padded to [batch, bucket] with their lengths, and the cache length for that bucket."""
        if isinstance(prompt_tokens, np.ndarray) or not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise InputError("Sampler.generate_tokens: prompt_tokens must be a non-empty list of token-id lists")
        vocab_size = self.model.config.vocab_size
        for i, prompt in enumerate(prompt_tokens):
            if len(prompt) == 0:
                raise InputError(f"Sampler.generate_tokens: prompt {i} is empty")
            if min(prompt) < 0 or max(prompt) >= vocab_size:
                raise InputError(f"Sampler.generate_tokens: prompt {i} has token ids outside [0, {vocab_size})")
        longest = max(len(p) for p in prompt_tokens)
        buckets = self.config.prompt_buckets
        if longest > buckets[-1]:
            raise InputError(f"Sampler: a prompt has {longest} tokens, more than the largest prompt bucket "
                             f"{buckets[-1]} (SamplerConfig.prompt_buckets)")
        bucket = next(b for b in buckets if b >= longest)
        cache_len = self.config.cache_len or min(
            -(-(bucket + self.config.max_new_tokens) // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE,
            self.model.config.max_seq_len)
        if longest > cache_len:
            raise InputError(f"Sampler: a prompt has {longest} tokens, more than cache_len={cache_len}")
        # Padded rows get a one-token prompt and start done, so they never hold the loop open.
        batch = max(2 ** math.ceil(math.log2(len(prompt_tokens))), self._data_parallel)
        batch = -(-batch // self._data_parallel) * self._data_parallel
        prompt_BP = np.zeros((batch, min(bucket, cache_len)), np.int32)
        lengths_B = np.ones((batch,), np.int32)
        for i, prompt in enumerate(prompt_tokens):
            prompt_BP[i, :len(prompt)] = prompt
            lengths_B[i] = len(prompt)
        return prompt_BP, lengths_B, cache_len

    # ---------------------------------------------------------------------------------------------------------
    # Sharding.
    # ---------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def sharding_context(self):
        if self.mesh is None:
            yield
            return
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def state_shardings(self) -> SamplingState:
        """Batch-major arrays over the data-parallel axes, the cache by its logical axes, scalars replicated."""
        batch = NamedSharding(self.mesh, P(self._batch_axes))
        abstract_cache = jax.eval_shape(lambda: self.model.init_cache(1, 1))
        cache = nn.logical_to_mesh_sharding(abstract_cache.logical_axes(), self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, P())
        return SamplingState(step=replicated, tokens_BN=batch, log_probs_BN=batch, num_tokens_B=batch, done_B=batch,
                             last_token_B=batch, prompt_BP=batch, cache=cache, rng=replicated)

    def put_batch(self, *arrays):
        if self.mesh is None:
            return arrays
        sharding = NamedSharding(self.mesh, P(self._batch_axes))
        return tuple(jax.device_put(a, sharding) for a in arrays)

    @staticmethod
    def fetch(x) -> np.ndarray:
        return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))

    # ---------------------------------------------------------------------------------------------------------
    # Device side: the jitted prefill and decode loop.
    # ---------------------------------------------------------------------------------------------------------

    def _prefill_fn(self, params, prompt_BP, lengths_B, live_B, rng, *, cache_len: int) -> SamplingState:
        """Writes every prompt into a fresh cache in one call and samples each row's first token from the logits
        at its last real position."""
        self.trace_count += 1  # runs only while tracing
        batch, prompt_len = prompt_BP.shape
        cache = self.model.init_cache(batch, cache_len)
        logits_B1V, cache = self.model.apply({"params": params}, prompt_BP, cache, lengths_B,
                                             logits_at_B=lengths_B - 1)
        logits_BV = logits_B1V[:, 0]
        history_BP = jnp.where(jnp.arange(prompt_len)[None] < lengths_B[:, None], prompt_BP, stopping.MASKED)
        N = self.config.max_new_tokens
        state = SamplingState(
            step=jnp.zeros((), jnp.int32),
            tokens_BN=jnp.full((batch, N), stopping.MASKED, jnp.int32),
            log_probs_BN=jnp.zeros((batch, N), jnp.float32),
            num_tokens_B=jnp.zeros((batch,), jnp.int32),
            done_B=~live_B,
            last_token_B=jnp.zeros((batch,), jnp.int32),
            prompt_BP=history_BP,
            cache=cache,
            rng=rng,
        )
        return self._sample_and_record(state, logits_BV)

    def _decode_fn(self, params, state: SamplingState) -> SamplingState:
        """Feeds each row's newest token and samples the next, until max_new_tokens or every row is done."""
        self.trace_count += 1

        def cond(state):
            return (state.step < self.config.max_new_tokens) & ~jnp.all(state.done_B)

        def body(state):
            # Done rows still run (the batch is fixed) but do not advance: their cache length stays put.
            num_new_B = (~state.done_B).astype(jnp.int32)
            logits_B1V, cache = self.model.apply({"params": params}, state.last_token_B[:, None], state.cache,
                                                 num_new_B)
            return self._sample_and_record(state.replace(cache=cache), logits_B1V[:, 0])

        return jax.lax.while_loop(cond, body, state)

    def _sample_and_record(self, state: SamplingState, logits_BV) -> SamplingState:
        """Samples token `state.step` of every live row, masks it in done rows, and updates the done flags."""
        sampling_config = self.config.sampling
        history_BH = None
        if sampling_config.repetition_penalty != 1:
            history_BH = jnp.concatenate([state.prompt_BP, state.tokens_BN], axis=1)
        token_B = sampling.sample(jax.random.fold_in(state.rng, state.step), logits_BV, sampling_config, history_BH)
        live_B = ~state.done_B
        token_B = jnp.where(live_B, token_B, stopping.MASKED)
        log_prob_B = jnp.where(live_B, sampling.log_probs(logits_BV, jnp.maximum(token_B, 0)), 0.0)
        tokens_BN = jax.lax.dynamic_update_index_in_dim(state.tokens_BN, token_B, state.step, axis=1)
        stop_B = stopping.is_stop(token_B, tokens_BN, state.step, self.config.stop_tokens, self._sequence_ids)
        # The new token would be written at position lengths_B on the next step; a full cache has no room for it.
        # (A cache of fixed-size states only, max_len None, never fills.)
        max_len = state.cache.max_len
        cache_full_B = state.cache.lengths_B >= max_len if max_len is not None else jnp.zeros_like(state.done_B)
        return state.replace(
            step=state.step + 1,
            tokens_BN=tokens_BN,
            log_probs_BN=jax.lax.dynamic_update_index_in_dim(state.log_probs_BN, log_prob_B, state.step, axis=1),
            num_tokens_B=state.num_tokens_B + live_B,
            done_B=state.done_B | stop_B | cache_full_B,
            last_token_B=jnp.where(live_B, token_B, state.last_token_B),
        )


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
