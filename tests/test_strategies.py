"""The strategy contract (samplers/strategy.py), checked for every decoding strategy in samplers/ on one hybrid
model (softmax and lightning layers): it runs through the engine, reuses its compilations, gives the same tokens
sharded, leaves done rows' caches alone, and keeps its state batch-major."""

import importlib
import inspect
import pkgutil

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import samplers
from models.cache import Cache
from models.llama import Config, Model
from parallel import mesh as mesh_lib
from samplers import ngram_store, stopping
from samplers.draft_model import DraftModel
from samplers.engine import Sampler, SamplerConfig
from samplers.jacobi import Jacobi, JacobiConfig
from samplers.plain import PlainSampling
from samplers.sampling import SamplingConfig
from samplers.speculative import Speculative, SpeculativeConfig
from samplers.strategy import Emitted, Strategy
from samplers.superposed import Superposed, SuperposedConfig

VOCAB = 64
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [40]]
OTHER_PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8]]


def _store():
    rng = np.random.default_rng(0)
    return ngram_store.build_ngram_store([rng.integers(0, VOCAB, 50) for _ in range(30)], (2, 3), vocab_size=VOCAB)


def _draft_model():
    draft = Model(Config(vocab_size=VOCAB, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=2, head_dim=8,
                         mlp_dim=32, max_seq_len=256))
    return DraftModel(draft, nn.meta.unbox(draft.init(jax.random.key(1), *draft.example_inputs())["params"]))


# Every strategy class of samplers/ and how to make one; a new strategy must be added here to be checked.
STRATEGIES = {
    "Jacobi": lambda: Jacobi(JacobiConfig(window=4)),
    "PlainSampling": lambda: PlainSampling(SamplingConfig(temperature=0.9, top_k=20, repetition_penalty=1.2)),
    "Superposed": lambda: Superposed(SuperposedConfig(num_drafts=2, ngram_orders=(2, 3), ngram_weights=(0.1, 0.2)),
                                     _store()),
    "Speculative": lambda: Speculative(SpeculativeConfig((2, 1), SamplingConfig(temperature=0.9, top_k=20)),
                                       _draft_model()),
}


def _strategy_classes() -> set[str]:
    names = set()
    for info in pkgutil.iter_modules(samplers.__path__):
        module = importlib.import_module(f"samplers.{info.name}")
        names |= {name for name, cls in inspect.getmembers(module, inspect.isclass)
                  if issubclass(cls, Strategy) and cls is not Strategy and cls.__module__ == module.__name__}
    return names


# Strategies over another model family, checked with that model where it is tested.
OTHER_FAMILIES = {"DiffusionTokens": "tests/test_image_ar.py: engine sampling equals an uncached reference, sharded"}


def test_every_strategy_is_checked():
    assert _strategy_classes() == set(STRATEGIES) | set(OTHER_FAMILIES)


@pytest.fixture(scope="module")
def model_and_params():
    model = Model(Config(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                         mlp_dim=64, max_seq_len=256, mixer_pattern="lightning,softmax", lightning_block_size=8))
    params = nn.meta.unbox(model.init(jax.random.key(0), *model.example_inputs())["params"])
    return model, jax.tree.map(lambda x: 3.0 * x, params)


def _caches(tree) -> list[Cache]:
    return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Cache)) if isinstance(x, Cache)]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_contract(model_and_params, name):
    model, params = model_and_params
    config = SamplerConfig(max_new_tokens=6, prompt_buckets=(8,), stop_tokens=(3,))
    sampler = Sampler(model, params, None, config, STRATEGIES[name]())

    state = sampler.decode(sampler.prefill(PROMPTS, seed=1))
    output = sampler.output(state, len(PROMPTS))
    assert len(output.tokens) == len(PROMPTS)
    assert np.asarray(state.done_B).all()
    num_tokens_B = np.asarray(state.num_tokens_B)
    tokens_BN = np.asarray(state.tokens_BN)
    assert (num_tokens_B <= 6).all()
    assert (tokens_BN[np.arange(tokens_BN.shape[1])[None] >= num_tokens_B[:, None]] == stopping.MASKED).all()

    # The padded row (index 3: a one-token prompt, done from the start) was never advanced by any step.
    caches = _caches(state.strategy)
    assert caches and all(int(cache.lengths_B[3]) == 1 for cache in caches)
    # Batch-major: every array but scalars and caches has the batch first.
    others = jax.tree.leaves(jax.tree.map(lambda x: None if isinstance(x, Cache) else x, state.strategy,
                                          is_leaf=lambda x: isinstance(x, Cache)))
    assert all(x.ndim == 0 or x.shape[0] == 4 for x in others)

    # Same bucket and batch, another budget: no new compilation, and the same result for the same input.
    count = sampler.trace_count
    sampler.generate_tokens(OTHER_PROMPTS, seed=2, max_new_tokens=4)
    assert sampler.generate_tokens(PROMPTS, seed=1) == output and sampler.trace_count == count

    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 2}), jax.devices()[:4])
    sharded = Sampler(model, params, None, config, STRATEGIES[name](), mesh=mesh, rules=mesh_lib.LOGICAL_AXIS_RULES)
    assert sharded.generate_tokens(PROMPTS, seed=1).tokens == output.tokens


# ---------------------------------------------------------------------------------------------------------------------
# What the contract allows beyond one token per step: a toy greedy draft-and-verify strategy (speculative decoding
# with one draft token), with a draft model's cache beside the target's, several tokens per step, and per-row
# rollback. Its tokens must be exactly greedy decoding's.

@flax.struct.dataclass
class DraftVerifyState:
    target: Cache  # holds every token but the newest
    draft: Cache  # likewise
    last_token_B: jax.Array


class GreedyDraftVerify(Strategy):
    tokens_per_step = 2  # the draft token if the target agrees, and the target's own next token
    cache_window = 2
    rollback_window = 2

    def __init__(self, draft_model, draft_params):
        self.draft_model, self.draft_params = draft_model, draft_params

    def prepare(self, sampler):
        return sampler.place_params(self.draft_model, self.draft_params)

    def _draft(self, ctx, tokens_BT, cache, num_new_B):
        return self.draft_model.apply({"params": ctx.constants}, tokens_BT, cache, num_new_B)

    def init(self, ctx, prefill):
        draft = self.draft_model.init_cache(prefill.prompt_BP.shape[0], prefill.cache.capacity)
        _, draft = self._draft(ctx, prefill.prompt_BP, draft, prefill.lengths_B)
        first_B = jnp.argmax(prefill.logits_BV, axis=-1).astype(jnp.int32)
        emitted = Emitted(first_B[:, None], jnp.zeros((first_B.shape[0], 1)), jnp.ones_like(first_B))
        return DraftVerifyState(prefill.cache, draft, first_B), emitted

    def step(self, ctx, state):
        active_B = ctx.active_B.astype(jnp.int32)
        draft_logits_B1V, draft = self._draft(ctx, state.last_token_B[:, None], state.draft, active_B)
        guess_B = jnp.argmax(draft_logits_B1V[:, 0], axis=-1).astype(jnp.int32)
        before_B = state.target.lengths_B
        logits_B2V, target = ctx.forward(jnp.stack([state.last_token_B, guess_B], 1), state.target, 2 * active_B)
        greedy_B2 = jnp.argmax(logits_B2V, axis=-1).astype(jnp.int32)
        accepted_B = (greedy_B2[:, 0] == guess_B).astype(jnp.int32) * active_B
        # Rejected rows drop the guess from the target cache; accepted rows feed it to the draft too.
        target = target.rollback(before_B + active_B + accepted_B)
        _, draft = self._draft(ctx, guess_B[:, None], draft, accepted_B)
        last_B = jnp.where(accepted_B == 1, greedy_B2[:, 1], greedy_B2[:, 0])
        emitted = Emitted(jnp.where(accepted_B[:, None] == 1, jnp.stack([guess_B, greedy_B2[:, 1]], 1), greedy_B2),
                          jnp.zeros((last_B.shape[0], 2)), 1 + accepted_B)
        return DraftVerifyState(target, draft, jnp.where(ctx.active_B, last_B, state.last_token_B)), emitted

    def is_done(self, ctx, state):
        return ~state.target.has_room(self.cache_window) | ~state.draft.has_room(self.cache_window)


def test_draft_and_verify_with_two_caches_and_rollback_equals_greedy(model_and_params):
    model, params = model_and_params
    # A draft close to the target (the same model, perturbed weights): it agrees often, but not always.
    leaves, treedef = jax.tree.flatten(params)
    draft_params = jax.tree.unflatten(treedef, [
        x * (1 + 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(3), i), x.shape))
        for i, x in enumerate(leaves)])
    config = SamplerConfig(max_new_tokens=12, prompt_buckets=(8,))
    greedy = Sampler(model, params, None, config).generate_tokens(PROMPTS)
    sampler = Sampler(model, params, None, config, GreedyDraftVerify(model, draft_params))
    state = sampler.decode(sampler.prefill(PROMPTS))
    assert sampler.output(state, len(PROMPTS)).tokens == greedy.tokens
    # 12 tokens take 1 + 11 steps if every guess is rejected, 1 + 6 if every one is accepted.
    assert 7 < int(state.steps) < 12, int(state.steps)
