"""The decode engine against the model's full forward (greedy tokens and log-probs), batching, buckets, stop rules,
the token budget, a full cache, sharding invariance on the 2x4 mesh, the Pallas decode kernel, and input checks."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
from jax.sharding import NamedSharding, PartitionSpec as P
from tokenizers import decoders, models, pre_tokenizers, trainers

from configs import lm
from errors import InputError
from models.llama import Config, Model
from parallel import mesh as mesh_lib
from samplers import stopping
from samplers.engine import Sampler, SamplerConfig
from samplers.plain import PlainSampling
from samplers.sampling import SamplingConfig
from samplers.strategy import Emitted, Strategy

MAX_NEW = 8
BUCKETS = (8, 16)
REFERENCE_LEN = 32  # the full forward runs on sequences right-padded to this, so it compiles once
TEXT = """def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
"""
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [40], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT] * 4, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def model_config(tokenizer):
    return Config(vocab_size=tokenizer.get_vocab_size(), num_layers=2, embed_dim=64, num_heads=8, num_kv_heads=4,
                  head_dim=16, mlp_dim=128, max_seq_len=256)


@pytest.fixture(scope="module")
def params(model_config):
    params = nn.meta.unbox(Model(model_config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    # Larger weights than at init give peaked logits, so argmax is far from ties and float noise cannot flip it.
    return jax.tree.map(lambda x: 3.0 * x, params)


@pytest.fixture(scope="module")
def greedy(model_config, params, tokenizer):
    config = SamplerConfig(max_new_tokens=MAX_NEW, prompt_buckets=BUCKETS)
    return Sampler(Model(model_config), params, tokenizer, config)


def greedy_by_full_forward(model, params, prompts, num_new=MAX_NEW):
    """Greedy tokens and their log-probs by re-running the full forward (no cache) on the growing sequences,
    right-padded to REFERENCE_LEN so the forward compiles once."""
    forward = jax.jit(lambda tokens_BT: model.apply({"params": params}, tokens_BT)[0])
    sequences = [list(p) for p in prompts]
    new_tokens, new_log_probs = [[] for _ in prompts], [[] for _ in prompts]
    for _ in range(num_new):
        tokens_BT = np.zeros((len(prompts), REFERENCE_LEN), np.int32)
        for b, seq in enumerate(sequences):
            tokens_BT[b, :len(seq)] = seq
        logits_BTV = np.asarray(forward(tokens_BT))
        for b, seq in enumerate(sequences):
            logits_V = logits_BTV[b, len(seq) - 1]
            token = int(np.argmax(logits_V))
            log_probs_V = logits_V - np.log(np.sum(np.exp(logits_V - logits_V.max()))) - logits_V.max()
            seq.append(token)
            new_tokens[b].append(token)
            new_log_probs[b].append(float(log_probs_V[token]))
    return new_tokens, new_log_probs


@pytest.fixture(scope="module")
def reference(model_config, params):
    return lambda prompts: greedy_by_full_forward(Model(model_config), params, prompts)


@pytest.fixture(scope="module")
def reference_greedy(reference):
    return reference(PROMPTS)


def test_greedy_equals_full_forward_argmax_with_log_probs(greedy, reference_greedy):
    output = greedy.generate_tokens(PROMPTS)
    tokens, log_probs = reference_greedy
    assert output.tokens == tokens
    np.testing.assert_allclose(np.array(output.log_probs), np.array(log_probs), atol=1e-4)
    assert output.stop_reason == ["max_new_tokens"] * len(PROMPTS)
    assert all(len(t) == MAX_NEW for t in output.tokens)


def test_batch_equals_each_prompt_alone(greedy, reference_greedy):
    for prompt, tokens in zip(PROMPTS, reference_greedy[0]):
        assert greedy.generate_tokens([prompt]).tokens == [tokens]


def test_prompts_in_the_same_bucket_do_not_retrace(greedy, reference):
    prompts = [[7] * 9, [8] * 16, [2, 3] * 5]  # bucket 16, batch padded to 4, as in PROMPTS
    greedy.generate_tokens(PROMPTS)
    count = greedy.trace_count
    assert greedy.generate_tokens(prompts).tokens == reference(prompts)[0]
    assert greedy.trace_count == count


def test_changing_max_new_tokens_does_not_retrace(greedy, reference_greedy):
    greedy.generate_tokens(PROMPTS)
    count = greedy.trace_count
    shorter = greedy.generate_tokens(PROMPTS, max_new_tokens=3)
    assert shorter.tokens == [t[:3] for t in reference_greedy[0]]
    assert shorter.stop_reason == ["max_new_tokens"] * len(PROMPTS)
    assert greedy.trace_count == count


def test_streamed_chunks_add_up_to_the_output(greedy, reference_greedy, tokenizer):
    chunks = []
    output = greedy.generate_tokens(PROMPTS, on_chunk=chunks.append, steps_per_chunk=3)
    assert output.tokens == reference_greedy[0]
    # The prefill's token, then 3 per chunk: 1 + 3 + 3 + 1 = MAX_NEW.
    assert [len(chunk.tokens[0]) for chunk in chunks] == [1, 3, 3, 1]
    assert [sum((chunk.tokens[b] for chunk in chunks), []) for b in range(len(PROMPTS))] == output.tokens
    assert chunks[-1].done == [True] * len(PROMPTS) and not any(chunks[0].done)
    streamed = list(greedy.stream(["def push(self"], steps_per_chunk=2))
    whole = greedy.generate(["def push(self"])
    assert sum((chunk.tokens[0] for chunk in streamed), []) == whole.tokens[0]


def test_stop_token_ends_row_and_masks_later_tokens(model_config, params, reference_greedy):
    tokens = reference_greedy[0]
    stop = tokens[0][2] if tokens[0][2] not in tokens[0][:2] else tokens[0][1]
    sampler = Sampler(Model(model_config), params, None,
                      SamplerConfig(max_new_tokens=MAX_NEW, prompt_buckets=BUCKETS, stop_tokens=(stop, 0)))
    state = sampler.decode(sampler.prefill(PROMPTS))
    output = sampler.output(state, len(PROMPTS))
    assert stop in output.tokens[0]
    # In the buffers, everything after a row's stop token is masked.
    num_tokens_B = np.asarray(state.num_tokens_B)[:, None]
    later_BN = np.arange(state.tokens_BN.shape[1])[None] >= num_tokens_B
    assert (np.asarray(state.tokens_BN)[later_BN] == stopping.MASKED).all()
    assert (np.asarray(state.log_probs_BN)[later_BN] == 0).all()
    assert bool(np.asarray(state.done_B)[0])
    for row, expected in zip(range(len(PROMPTS)), tokens):
        end = expected.index(stop) + 1 if stop in expected else MAX_NEW
        assert output.tokens[row] == expected[:end]
        assert len(output.log_probs[row]) == end
        assert output.stop_reason[row] == ("stop_token" if stop in expected else "max_new_tokens")


class ChunkReplay(Strategy):
    """Emits given tokens, row b (b % 3) + 1 of them per step: the engine's chunk handling without a model."""

    tokens_per_step = 3

    def __init__(self, tokens_BN):
        self.tokens_BN = np.asarray(tokens_BN, np.int32)

    def prepare(self, sampler):
        return sampler.place_replicated(self.tokens_BN)

    def init(self, ctx, prefill):
        return prefill.cache, self._emit(ctx, jnp.zeros_like(ctx.num_tokens_B))

    def step(self, ctx, cache):
        return cache, self._emit(ctx, ctx.num_tokens_B)

    def _emit(self, ctx, start_B):
        rows_B = jnp.arange(start_B.shape[0])
        count_B = rows_B % 3 + 1
        index_BC = jnp.minimum(start_B[:, None] + jnp.arange(3)[None], self.tokens_BN.shape[1] - 1)
        tokens_BC = ctx.constants[jnp.minimum(rows_B, ctx.constants.shape[0] - 1)[:, None], index_BC]
        return Emitted(tokens_BC, jnp.zeros(tokens_BC.shape, jnp.float32), count_B)

    def is_done(self, ctx, cache):
        return jnp.zeros(cache.lengths_B.shape, bool)


def test_stops_inside_multi_token_chunks_cut_the_row_there(model_config, params, tokenizer):
    """Rows emit 1, 2 or 3 tokens per step at their own positions; a stop token or a stop sequence anywhere inside
    a chunk ends the row right after it, and the budget cuts a chunk that would pass it."""
    rows = [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16]] * 2 + [[20, 21, 22, 23, 24, 25, 26, 27, 28, 29]] * 2
    model = Model(model_config)

    def run(stop_tokens=(), stop_sequences=(), max_new_tokens=8):
        sampler = Sampler(model, params, tokenizer, SamplerConfig(max_new_tokens, prompt_buckets=BUCKETS,
                                                                  stop_tokens=stop_tokens,
                                                                  stop_sequences=stop_sequences), ChunkReplay(rows))
        return sampler.generate_tokens([[1, 2]] * 4)

    output = run()
    assert output.tokens == [row[:8] for row in rows] and output.stop_reason == ["max_new_tokens"] * 4
    output = run(stop_tokens=(11, 23))  # reached mid-chunk for rows 1 and 2 (2 and 3 tokens per step)
    assert output.tokens == [rows[0][:5], rows[1][:5], rows[2][:4], rows[3][:4]]
    assert output.stop_reason == ["stop_token"] * 4
    stop_text = tokenizer.decode([9, 10])
    output = run(stop_sequences=(stop_text,))
    for row in range(2):
        assert output.tokens[row] == rows[row][:4] and output.stop_reason[row] == "stop_sequence"
        assert output.text[row] == tokenizer.decode(rows[row][:2])
    assert output.tokens[2:] == [row[:8] for row in rows[2:]]
    assert run(max_new_tokens=5).tokens == [row[:5] for row in rows]


def test_stop_sequence_cuts_text(model_config, params, tokenizer, reference):
    prompts = ["def push(self", "return fib", "class S"]
    tokens = reference([tokenizer.encode(p, add_special_tokens=False).ids for p in prompts])[0]
    texts = [tokenizer.decode(t) for t in tokens]
    # A clean (valid UTF-8) piece from the middle of the second completion.
    stop = next(s for k in range(2, MAX_NEW - 1) if "\ufffd" not in (s := tokenizer.decode(tokens[1][k:k + 2])) and s)
    sampler = Sampler(Model(model_config), params, tokenizer,
                      SamplerConfig(max_new_tokens=MAX_NEW, prompt_buckets=BUCKETS, stop_sequences=(stop,)))
    output = sampler.generate(prompts)
    for row, text in enumerate(texts):
        if stop in text:
            assert output.text[row] == text[:text.find(stop)]
            assert output.stop_reason[row] == "stop_sequence"
            assert stop in tokenizer.decode(output.tokens[row])
            assert stop not in tokenizer.decode(output.tokens[row][:-1])
            assert output.tokens[row] == tokens[row][:len(output.tokens[row])]
            assert len(output.log_probs[row]) == len(output.tokens[row])
        else:
            assert (output.text[row], output.tokens[row]) == (text, tokens[row])
    assert output.stop_reason[1] == "stop_sequence"


def test_full_cache_ends_row(model_config, params, reference):
    sampler = Sampler(Model(model_config), params, None,
                      SamplerConfig(max_new_tokens=MAX_NEW, cache_len=16, prompt_buckets=(16,)))
    prompts = [PROMPTS[3], PROMPTS[0]]  # 12 tokens: room for 4 more in the cache, so 5 new ones (the last unwritten)
    output = sampler.generate_tokens(prompts)
    expected = reference(prompts)[0]
    assert output.tokens == [expected[0][:5], expected[1]]
    assert output.stop_reason == ["cache_full", "max_new_tokens"]


def test_seeded_sampling_on_2x4_mesh_equals_one_device(model_config, params):
    config = SamplerConfig(max_new_tokens=MAX_NEW, prompt_buckets=BUCKETS)
    strategy = PlainSampling(SamplingConfig(temperature=0.8, top_p=0.9, repetition_penalty=1.3))
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 4}))
    rules = lm.get_config("tiny").logical_axis_rules
    single = Sampler(Model(model_config), params, None, config, strategy)
    sharded = Sampler(Model(model_config), params, None, config, strategy, mesh=mesh, rules=rules)
    prompts = PROMPTS[:3]
    output = single.generate_tokens(prompts, seed=3)
    assert sharded.generate_tokens(prompts, seed=3).tokens == output.tokens
    assert single.generate_tokens(prompts, seed=4).tokens != output.tokens

    state = sharded.prefill(prompts)
    k_BKSH = state.strategy.cache.layers[0].k_BKSH
    assert k_BKSH.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None)), 4)


@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh_2x4"])
def test_pallas_decode_matches_xla(model_config, params, reference_greedy, sharded):
    """The flash-decoding kernel, on one device and run per shard of a 2x4 mesh (batch over data, heads over
    tensor), gives greedy decoding's tokens."""
    pallas = Model(dataclasses.replace(model_config, softmax_implementation="pallas"))
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 4})) if sharded else None
    sampler = Sampler(pallas, params, None, SamplerConfig(max_new_tokens=MAX_NEW, prompt_buckets=BUCKETS), mesh=mesh,
                      rules=mesh_lib.LOGICAL_AXIS_RULES)
    assert sampler.generate_tokens(PROMPTS).tokens == reference_greedy[0]


PALLAS_EVERYWHERE = dict(softmax_implementation="pallas", lightning_implementation="pallas",
                         lightning_decode_implementation="pallas")


@pytest.mark.parametrize("mixer_pattern, implementations, sharded", [
    ("lightning", {}, False), ("lightning,softmax", {}, False), ("lightning,softmax", PALLAS_EVERYWHERE, True)],
    ids=["lightning", "hybrid", "hybrid-pallas-mesh_2x4"])
def test_lightning_decoder_decodes_through_the_engine(model_config, mixer_pattern, implementations, sharded):
    """Linear-attention layers carry a constant-size state through the engine; greedy equals the full forward,
    with every kernel also run per shard of a 2x4 mesh."""
    model = Model(dataclasses.replace(model_config, mixer_pattern=mixer_pattern, lightning_block_size=8,
                                      **implementations))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(lambda x: 3.0 * x, params)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 4})) if sharded else None
    sampler = Sampler(model, params, None, SamplerConfig(max_new_tokens=MAX_NEW, prompt_buckets=BUCKETS), mesh=mesh,
                      rules=mesh_lib.LOGICAL_AXIS_RULES)
    assert sampler.generate_tokens(PROMPTS).tokens == greedy_by_full_forward(model, params, PROMPTS)[0]


@pytest.mark.parametrize("make, match", [
    (lambda s: s.generate_tokens([[1, 2], []]), "prompt 1 is empty"),
    (lambda s: s.generate([""]), r"prompts\[0\] is empty"),
    (lambda s: s.generate_tokens([[1] * 17]), "17 tokens"),
    (lambda s: Sampler(s.model, s.params, None, SamplerConfig(4, cache_len=8, prompt_buckets=(16,)))
     .generate_tokens([[1] * 9]), "cache_len=8"),
    (lambda s: SamplerConfig(max_new_tokens=0), "max_new_tokens"),
    (lambda s: SamplerConfig(max_new_tokens=-3), "max_new_tokens"),
    (lambda s: Sampler(s.model, s.params, None, SamplerConfig(4, stop_tokens=(s.model.config.vocab_size,))),
     "stop_tokens"),
    (lambda s: SamplingConfig(top_p=0.0), "top_p"),
    (lambda s: SamplingConfig(top_p=1.5), "top_p"),
    (lambda s: SamplingConfig(temperature=-0.5), "temperature"),
    (lambda s: s.generate_tokens([]), "prompt_tokens"),
])
def test_bad_input_raises_one_line_input_error(greedy, make, match):
    with pytest.raises(InputError, match=match) as error:
        make(greedy)
    assert "\n" not in str(error.value)
