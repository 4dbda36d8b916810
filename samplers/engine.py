"""The decode engine: the host side of generation and one jitted loop that every decoding strategy runs in.

As in the gemma sampler, the static configuration (cache length, prompt buckets, stop rules) lives in a frozen
`SamplerConfig`, apart from the array state (`DecodeState`) that the jitted functions carry, and the decoding method
is a swappable strategy (samplers/strategy.py):

  sampler = Sampler(model, params, tokenizer, SamplerConfig(max_new_tokens=64, stop_tokens=(eos,)),
                    strategy=PlainSampling(SamplingConfig(temperature=0.8)), mesh=mesh, rules=rules)
  output = sampler.generate(["def fib(n):", "import os"], seed=0)
  output.tokens, output.text, output.log_probs, output.stop_reason
  for chunk in sampler.stream(["def fib(n):"], steps_per_chunk=16):   # tokens as they are made
      print(chunk.tokens[0], end="")

Shapes are kept few so that new requests reuse compilations: prompts are right-padded to the smallest bucket that
holds the longest one, the batch to the next power of two (and multiple of the data-parallel size), and the token
buffer and automatic cache length to multiples of 128. `max_new_tokens` is a traced bound, so changing it within
those sizes does not recompile.
"""

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import shapes
from errors import InputError, checks
from models.cache import Cache
from parallel import mesh as mesh_lib
from samplers import stopping
from samplers.plain import PlainSampling
from samplers.strategy import Context, Emitted, Prefill, Strategy

# Token buffers and automatic cache lengths are rounded up to this, so nearby budgets share a compilation.
LENGTH_MULTIPLE = 128
STOP_REASONS = ("", "stop_token", "stop_sequence", "max_new_tokens")  # codes 0..3; 4 is the strategy's own
_RUNNING, _STOP_TOKEN, _STOP_SEQUENCE, _MAX_NEW_TOKENS, _STRATEGY = range(5)
_UNBOUNDED = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """What to generate; frozen and hashable, the static half of the engine.

    max_new_tokens is the default budget of a call (each call may pass its own). cache_len 0 sizes the cache per
    prompt bucket: bucket + budget (+ the strategy's extra window), rounded up to a multiple of 128 and capped at
    the model's max_seq_len. A row stops at a stop token, at the end of a stop sequence (the text is cut before
    it), after max_new_tokens tokens, or when its strategy says it is done (a full cache).
    """

    max_new_tokens: int
    cache_len: int = 0
    prompt_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    stop_tokens: tuple[int, ...] = ()
    stop_sequences: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("prompt_buckets", "stop_tokens", "stop_sequences"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists would make the config unhashable
        checks.integer("SamplerConfig.max_new_tokens", self.max_new_tokens, minimum=1)
        checks.integer("SamplerConfig.cache_len", self.cache_len, minimum=0)
        if not self.prompt_buckets or not all(checks.is_int(b) and b > 0 for b in self.prompt_buckets):
            raise InputError(f"SamplerConfig.prompt_buckets={self.prompt_buckets} must be positive integers")
        object.__setattr__(self, "prompt_buckets", tuple(sorted(set(self.prompt_buckets))))
        if not all(checks.is_int(t) and t >= 0 for t in self.stop_tokens):
            raise InputError(f"SamplerConfig.stop_tokens={self.stop_tokens} must be token ids >= 0")
        if not all(isinstance(s, str) and s for s in self.stop_sequences):
            raise InputError(f"SamplerConfig.stop_sequences={self.stop_sequences} must be non-empty strings")


@flax.struct.dataclass
class DecodeState:
    """The arrays the decode loop carries. Row b's new tokens are tokens_BN[b, :num_tokens_B[b]]; later entries
    are stopping.MASKED (log-prob 0)."""

    tokens_BN: jax.Array
    log_probs_BN: jax.Array
    num_tokens_B: jax.Array
    done_B: jax.Array
    reason_B: jax.Array  # why a row ended: an index of STOP_REASONS, or 4 for the strategy's done_reason
    max_new_tokens: jax.Array  # int32 scalar
    steps: jax.Array  # int32 scalar: strategy calls so far (the prefill's init is the first)
    strategy: object  # the strategy's own state pytree


@dataclasses.dataclass
class SamplerOutput:
    """Per prompt: new tokens (up to and including the stop token or the end of the stop sequence), their text
    (without the stop token's text and cut before any stop sequence), the model's log-prob of each token (raw
    logits), and why the row ended: "stop_token", "stop_sequence", "max_new_tokens" or the strategy's reason
    ("cache_full" for plain sampling)."""

    tokens: list[list[int]]
    text: list[str]
    log_probs: list[list[float]]
    stop_reason: list[str]


@dataclasses.dataclass
class StreamChunk:
    """Per prompt, the tokens emitted since the previous chunk, and whether the row has ended."""

    tokens: list[list[int]]
    done: list[bool]


class Sampler:
    """Generates from `model` (a models/ Linen module with the model contract) with `params`, by `strategy`.

    tokenizer: a `tokenizers.Tokenizer`, needed by `generate` and stop sequences; `generate_tokens` works
    without one. mesh/rules: run sharded, caches by their logical axes and params by their logical names;
    `trace_count` counts how often the jitted functions were traced (a new bucket or batch size traces).
    """

    def __init__(self, model, params, tokenizer, config: SamplerConfig, strategy: Strategy = PlainSampling(), *,
                 mesh=None, rules=None):
        self.model, self.tokenizer, self.config, self.strategy = model, tokenizer, config, strategy
        self.mesh, self.rules = mesh, rules
        vocab_size, max_seq_len = model.config.vocab_size, model.config.max_seq_len
        for token in config.stop_tokens:
            if token >= vocab_size:
                raise InputError(f"SamplerConfig.stop_tokens: {token} is outside the vocabulary [0, {vocab_size})")
        if config.cache_len > max_seq_len:
            raise InputError(f"SamplerConfig.cache_len={config.cache_len} exceeds the model's "
                             f"max_seq_len={max_seq_len}")
        if config.stop_sequences and tokenizer is None:
            raise InputError("SamplerConfig.stop_sequences need a tokenizer; pass one to Sampler")
        self._sequence_ids = stopping.stop_sequence_ids(tokenizer, config.stop_sequences) if tokenizer else ()
        self.trace_count = 0
        if mesh is None:
            self._batch_axes, self._data_parallel = None, 1
        else:
            self._batch_axes = nn.logical_to_mesh_axes(("cache_batch",), rules)[0]
            self._data_parallel = math.prod(mesh.shape[a] for a in jax.tree.leaves(self._batch_axes))
        self.params = self.place_params(model, params)
        self.constants = strategy.prepare(self)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_len", "token_capacity"))
        self._decode = jax.jit(self._decode_fn, donate_argnames="state")

    # ---------------------------------------------------------------------------------------------------------
    # Host side: validation, padding, output, streaming.
    # ---------------------------------------------------------------------------------------------------------

    def generate(self, prompts: list[str], *, seed: int = 0, max_new_tokens: int | None = None,
                 on_chunk: Callable[[StreamChunk], None] | None = None, steps_per_chunk: int = 64):
        """Completes each prompt (tokenized without special tokens); the strategy's output (a SamplerOutput for
        strategies that emit tokens). With on_chunk, it is called with each chunk of new tokens as they are made."""
        return self.generate_tokens(self.encode(prompts), seed=seed, max_new_tokens=max_new_tokens,
                                    on_chunk=on_chunk, steps_per_chunk=steps_per_chunk)

    def generate_tokens(self, prompt_tokens: list[list[int]], *, seed: int = 0, max_new_tokens: int | None = None,
                        on_chunk: Callable[[StreamChunk], None] | None = None, steps_per_chunk: int = 64):
        """Completes each prompt given as token ids."""
        if on_chunk is None:
            return self.output(self.decode(self.prefill(prompt_tokens, seed=seed, max_new_tokens=max_new_tokens)),
                               len(prompt_tokens))
        for chunk, state in self._chunks(prompt_tokens, seed, max_new_tokens, steps_per_chunk):
            on_chunk(chunk)
        return self.output(state, len(prompt_tokens))

    def stream(self, prompts: list[str], *, seed: int = 0, max_new_tokens: int | None = None,
               steps_per_chunk: int = 16) -> Iterator[StreamChunk]:
        """The new tokens of each prompt, chunk by chunk: every `steps_per_chunk` loop steps the loop returns to
        the host, which yields what was emitted since the last chunk; ends when every row has ended."""
        for chunk, _ in self._chunks(self.encode(prompts), seed, max_new_tokens, steps_per_chunk):
            yield chunk

    def encode(self, prompts: list[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise InputError("Sampler.generate needs a tokenizer; pass one to Sampler or call generate_tokens")
        if isinstance(prompts, str):
            raise InputError("Sampler.generate: prompts must be a list of strings, got a single string")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise InputError(f"Sampler.generate: prompts[{i}] is empty or not a string: {prompt!r}")
        return [self.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]

    def _chunks(self, prompt_tokens, seed, max_new_tokens, steps_per_chunk):
        checks.integer("steps_per_chunk", steps_per_chunk, minimum=1)
        state = self.prefill(prompt_tokens, seed=seed, max_new_tokens=max_new_tokens)
        sent = np.zeros(len(prompt_tokens), np.int64)
        while True:
            tokens_BN, num_tokens_B, done_B = (self.fetch(x)[:len(prompt_tokens)]
                                               for x in (state.tokens_BN, state.num_tokens_B, state.done_B))
            chunk = StreamChunk([row[s:n].tolist() for row, s, n in zip(tokens_BN, sent, num_tokens_B)],
                                done_B.tolist())
            sent = num_tokens_B.astype(np.int64)
            yield chunk, state
            if done_B.all():
                return
            state = self.decode(state, max_steps=steps_per_chunk)

    def prefill(self, prompt_tokens: list[list[int]], *, seed: int = 0, max_new_tokens: int | None = None):
        """The DecodeState after the prompts are in the cache and the strategy has started (batch padded)."""
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        checks.integer("max_new_tokens", max_new_tokens, minimum=1)
        prompt_BP, lengths_B, cache_len = self.pad_prompts(prompt_tokens, max_new_tokens)
        live_B = np.arange(len(lengths_B)) < len(prompt_tokens)
        token_capacity = shapes.round_up(max_new_tokens, LENGTH_MULTIPLE)
        with self.sharding_context():
            return self._prefill(self.params, self.constants, *self.put_batch(prompt_BP, lengths_B, live_B),
                                 jax.random.key(seed), jnp.int32(max_new_tokens), cache_len=cache_len,
                                 token_capacity=token_capacity)

    def decode(self, state: DecodeState, max_steps: int | None = None) -> DecodeState:
        """Runs the loop until every row has ended, or for at most max_steps steps; `state` is donated."""
        with self.sharding_context():
            return self._decode(self.params, self.constants, state,
                                jnp.int32(_UNBOUNDED if max_steps is None else max_steps))

    def output(self, state: DecodeState, num_prompts: int):
        """The strategy's reading of the first `num_prompts` rows of a finished state."""
        return self.strategy.output(self, state, num_prompts)

    def sequences(self, state: DecodeState, num_prompts: int) -> SamplerOutput:
        """The emitted tokens of the first `num_prompts` rows as tokens, text, log-probs and stop reasons; a stop
        sequence is found in the text, where the model may have spelled it with other tokens than its own."""
        tokens_BN, log_probs_BN, num_tokens_B, reason_B = (
            self.fetch(x)[:num_prompts] for x in (state.tokens_BN, state.log_probs_BN, state.num_tokens_B,
                                                  state.reason_B))
        output = SamplerOutput([], [], [], [])
        for row_tokens, row_log_probs, n, code in zip(tokens_BN, log_probs_BN, num_tokens_B, reason_B):
            tokens, log_probs = row_tokens[:n].tolist(), row_log_probs[:n].tolist()
            reason = STOP_REASONS[code] if code < _STRATEGY else self.strategy.done_reason
            text_tokens = tokens[:-1] if reason == "stop_token" else tokens
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

    def pad_prompts(self, prompt_tokens, max_new_tokens: int):
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
        needed = bucket + max_new_tokens + self.strategy.cache_window - 1
        cache_len = self.config.cache_len or min(shapes.round_up(needed, LENGTH_MULTIPLE),
                                                 self.model.config.max_seq_len)
        if longest > cache_len:
            raise InputError(f"Sampler: a prompt has {longest} tokens, more than cache_len={cache_len}")
        # Padded rows get a one-token prompt and start done, so they never hold the loop open.
        batch = shapes.round_up(max(shapes.next_power_of_two(len(prompt_tokens)), self._data_parallel),
                                self._data_parallel)
        prompt_BP = np.zeros((batch, min(bucket, cache_len)), np.int32)
        lengths_B = np.ones((batch,), np.int32)
        for i, prompt in enumerate(prompt_tokens):
            prompt_BP[i, :len(prompt)] = prompt
            lengths_B[i] = len(prompt)
        return prompt_BP, lengths_B, cache_len

    # ---------------------------------------------------------------------------------------------------------
    # Placement and sharding.
    # ---------------------------------------------------------------------------------------------------------

    def place_params(self, model, params):
        """`params` of `model` on the mesh by their logical names, in the model's decode form (model.decode_params,
        computed once here rather than at every step), matrices cast once to the compute dtype: the model casts
        each matrix at every step, and casting once halves the bytes a bfloat16 step reads. Vectors (norm scales,
        biases) stay float32, as the model uses them."""
        params = nn.meta.unbox(params)
        if self.mesh is not None:
            params = jax.device_put(params, mesh_lib.sharded_abstract_params(model, self.mesh, self.rules)[1])
        with self.sharding_context():
            params = model.decode_params(params)
        dtype = jnp.dtype(model.config.dtype)
        return jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 and x.dtype != dtype else x, params)

    def place_replicated(self, tree):
        return jax.device_put(tree, None if self.mesh is None else NamedSharding(self.mesh, P()))

    @contextlib.contextmanager
    def sharding_context(self):
        if self.mesh is None:
            yield
            return
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def put_batch(self, *arrays):
        if self.mesh is None:
            return arrays
        sharding = NamedSharding(self.mesh, P(self._batch_axes))
        return tuple(jax.device_put(a, sharding) for a in arrays)

    def _constrain(self, state: DecodeState) -> DecodeState:
        """Pins the state's layout: caches by their logical axes, scalars replicated, all else over the batch."""
        if self.mesh is None:
            return state
        is_cache = lambda x: isinstance(x, Cache)

        def constrain(x):
            if is_cache(x):
                return jax.tree.map(nn.with_logical_constraint, x, x.logical_axes(),
                                    is_leaf=lambda a: isinstance(a, P))
            spec = P() if x.ndim == 0 else P(self._batch_axes)
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        return jax.tree.map(constrain, state, is_leaf=is_cache)

    @staticmethod
    def cache_bytes(tree) -> int:
        """Bytes the decode caches in `tree` hold as allocated: of a DecodeState, the target's and any draft
        model's."""
        caches = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Cache)) if isinstance(x, Cache)]
        return sum(leaf.nbytes for leaf in jax.tree.leaves(caches))

    @staticmethod
    def fetch(x) -> np.ndarray:
        return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))

    # ---------------------------------------------------------------------------------------------------------
    # Device side: the jitted prefill and the one decode loop.
    # ---------------------------------------------------------------------------------------------------------

    def _context(self, params, constants, state: DecodeState) -> Context:
        return Context(model=self.model, params=params, constants=constants, active_B=~state.done_B,
                       tokens_BN=state.tokens_BN, num_tokens_B=state.num_tokens_B,
                       max_new_tokens=state.max_new_tokens, step=state.steps, stop_tokens=self.config.stop_tokens)

    def _prefill_fn(self, params, constants, prompt_BP, lengths_B, live_B, rng, max_new_tokens, *, cache_len: int,
                    token_capacity: int) -> DecodeState:
        """Writes every prompt into a fresh cache in one call, unembeds each row's last position, and starts the
        strategy from there."""
        self.trace_count += 1  # runs only while tracing
        batch = prompt_BP.shape[0]
        cache = self.model.init_cache(batch, cache_len, self.strategy.rollback_window)
        logits_B1V, cache = self.model.apply({"params": params}, prompt_BP, cache, lengths_B,
                                             logits_at_B=lengths_B - 1)
        state = DecodeState(
            tokens_BN=jnp.full((batch, token_capacity), stopping.MASKED, jnp.int32),
            log_probs_BN=jnp.zeros((batch, token_capacity), jnp.float32),
            num_tokens_B=jnp.zeros((batch,), jnp.int32),
            done_B=~live_B,
            reason_B=jnp.zeros((batch,), jnp.int32),
            max_new_tokens=max_new_tokens,
            steps=jnp.zeros((), jnp.int32),
            strategy=None,
        )
        ctx = self._context(params, constants, state)
        strategy_state, emitted = self.strategy.init(ctx, Prefill(logits_B1V[:, 0], cache, prompt_BP, lengths_B, rng))
        return self._constrain(self._record(ctx, state.replace(strategy=strategy_state), emitted))

    def _decode_fn(self, params, constants, state: DecodeState, max_steps) -> DecodeState:
        """Runs strategy steps until every row has ended, or max_steps of them."""
        self.trace_count += 1
        first_step = state.steps

        def cond(state):
            return ~jnp.all(state.done_B) & (state.steps - first_step < max_steps)

        def body(state):
            ctx = self._context(params, constants, state)
            strategy_state, emitted = self.strategy.step(ctx, state.strategy)
            return self._record(ctx, state.replace(strategy=strategy_state), emitted)

        return self._constrain(jax.lax.while_loop(cond, body, state))

    def _record(self, ctx: Context, state: DecodeState, emitted: Emitted) -> DecodeState:
        """Writes each live row's emitted tokens at its own position, cut at the budget and after the first stop
        token or completed stop sequence inside the chunk; updates the done flags and stop reasons."""
        N, C = state.tokens_BN.shape[1], emitted.tokens_BC.shape[1]
        c_C = jnp.arange(C)
        position_BC = state.num_tokens_B[:, None] + c_C[None]
        valid_BC = ((c_C[None] < emitted.count_B[:, None]) & ~state.done_B[:, None]
                    & (position_BC < state.max_new_tokens))
        tokens_BC = jnp.where(valid_BC, emitted.tokens_BC, stopping.MASKED)
        scatter = jax.vmap(lambda row_N, slots_C, new_C: row_N.at[slots_C].set(new_C, mode="drop"))
        with_chunk_BN = scatter(state.tokens_BN, jnp.where(valid_BC, position_BC, N), tokens_BC)

        stop_token_BC = valid_BC & stopping.is_stop_token(tokens_BC, self.config.stop_tokens)
        stop_BC = stop_token_BC | (valid_BC & stopping.ends_stop_sequence(with_chunk_BN, position_BC,
                                                                          self._sequence_ids))
        # The chunk is kept up to and including its first stop; "first" by a cumulative count, which also
        # reads right for a chunk of zero tokens.
        stops_so_far_BC = jnp.cumsum(stop_BC, axis=1)
        kept_BC = valid_BC & (stops_so_far_BC - stop_BC == 0)
        stopped_B = jnp.any(stop_BC, axis=1)
        by_stop_token_B = jnp.any(stop_token_BC & (stops_so_far_BC == 1) & stop_BC, axis=1)
        slots_BC = jnp.where(kept_BC, position_BC, N)
        num_tokens_B = state.num_tokens_B + jnp.sum(kept_BC, axis=1)

        reason_B = jnp.select(
            [state.done_B, by_stop_token_B, stopped_B, num_tokens_B >= state.max_new_tokens,
             self.strategy.is_done(ctx, state.strategy)],
            [state.reason_B, _STOP_TOKEN, _STOP_SEQUENCE, _MAX_NEW_TOKENS, _STRATEGY], _RUNNING)
        return state.replace(
            tokens_BN=scatter(state.tokens_BN, slots_BC, tokens_BC),
            log_probs_BN=scatter(state.log_probs_BN, slots_BC, emitted.log_probs_BC.astype(jnp.float32)),
            num_tokens_B=num_tokens_B,
            done_B=state.done_B | (reason_B != _RUNNING),
            reason_B=reason_B,
            steps=state.steps + 1,
        )
