"""MatryoshkaKV beyond the layer: evaluation reading the bases file (checkpoints/restore.py) and the heterogeneous
per-head rate search (models/matryoshka_rates.py, tools/matryoshka_rates.py)."""

import functools
import os
import pathlib

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import evaluate
from benchmarks import superposed as superposed_benchmark
from checkpoints.huggingface.export import export_hf
from checkpoints.manager import Checkpoints
from configs import lm
from errors import InputError
from models import matryoshka_kv, matryoshka_pca, matryoshka_rates
from models.llama import Config, Model
from tools import matryoshka_rates as matryoshka_rates_tool

FIELDS = dict(vocab_size=300, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
              softmax_implementation="reference")  # 300: room for the byte-level BPE's 256 bytes
H = FIELDS["head_dim"]


def random_params(seed=1, scale=0.2):
    """Random parameters of the uncompressed model, drawn in numpy (compiling model.init is slow on a busy CPU)."""
    model = Model(Config(**FIELDS))
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones(x.shape) if path[-1].key == "scale" else
        jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), shapes)


def write_corpus(directory):
    directory.mkdir(exist_ok=True)
    for i in range(12):
        (directory / f"m{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i}\n"
                                                    for j in range(30)))


def eval_config(corpus_dir, **model_fields):
    config = lm.get_config("tiny")
    config.model.update(FIELDS, **model_fields)
    config.data.update(corpus=str(corpus_dir), validation_fraction=0.25, seq_len=16, global_batch_size=8,
                       tokenizer_train_bytes=100_000)
    config.evaluate.update(run=("validation",), validation={"num_batches": 2})
    return config


@functools.cache
def saved_run(root: str):
    """A workdir holding a checkpoint of the uncompressed model, and a PCA file of its keys and values."""
    root = pathlib.Path(root)
    write_corpus(root / "corpus")
    workdir = root / "run"
    params = random_params()
    checkpoints = Checkpoints(str(workdir))
    checkpoints.save({"step": jnp.array(3, jnp.int32), "params": params, "opt_state": {"count": jnp.zeros(())}},
                     iter(grain.MapDataset.range(4).to_iter_dataset()))
    checkpoints.wait_until_finished()
    checkpoints.close()
    calibration_BT = jax.random.randint(jax.random.key(7), (4, 16), 0, FIELDS["vocab_size"])
    stats = matryoshka_pca.moments(Model(Config(**FIELDS)), params, calibration_BT)
    bases = str(root / "matryoshka_kv.npz")
    matryoshka_pca.save(bases, matryoshka_pca.pca_params(stats), stats)
    return str(root / "corpus"), str(workdir), bases, params


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return saved_run(str(tmp_path_factory.mktemp("mkv")))


def test_evaluation_reads_the_bases_file(run):
    corpus_dir, workdir, bases, _ = run
    losses = {}
    for name, fields in (("base", {}), ("full", dict(kv_rank=H, kv_bases=bases)),
                         ("half", dict(kv_rank=H // 2, kv_bases=bases))):
        results = evaluate.evaluate(eval_config(corpus_dir, **fields), workdir)
        losses[name] = results["validation"]["loss"]
        assert results["step"] == 3
    assert losses["full"] == pytest.approx(losses["base"], rel=1e-5)
    assert np.isfinite(losses["half"]) and losses["half"] > losses["base"] * (1 + 1e-4)


@pytest.mark.parametrize("kind", ["workdir", "hf"])
def test_init_from_checkpoints_take_the_bases_file_too(run, tmp_path, kind):
    corpus_dir, workdir, bases, params = run
    base = evaluate.evaluate(eval_config(corpus_dir), workdir)["validation"]["loss"]  # writes the tokenizer
    source = workdir
    if kind == "hf":
        source = export_hf(params, eval_config(corpus_dir).model, os.path.join(workdir, "tokenizer.json"),
                           str(tmp_path / "hf"))
    config = eval_config(corpus_dir, kv_rank=H, kv_bases=bases)
    config.init_from = f"{kind}:{source}"
    results = evaluate.evaluate(config, str(tmp_path / "eval"))
    assert results["step"] is None and results["checkpoint"] == config.init_from
    assert results["validation"]["loss"] == pytest.approx(base, rel=1e-5)


def test_benchmark_loading_reads_the_bases_file(run):
    _, workdir, bases, params = run
    _, model, loaded, _ = superposed_benchmark.load_model("", workdir, dict(FIELDS, kv_rank=H // 2, kv_bases=bases))
    assert model.config.kv_rank == H // 2
    np.testing.assert_array_equal(loaded["layer_1"]["attention"]["matryoshka_kv"]["value_skew"],
                                  matryoshka_pca.load(bases)["layer_1"]["attention"]["matryoshka_kv"]["value_skew"])
    np.testing.assert_array_equal(loaded["embedding"], params["embedding"])


@pytest.mark.parametrize("fields, message", [
    (dict(kv_rank=4), "config.model.kv_rank=4 needs MatryoshkaKV bases, which the parameters of"),
    (dict(kv_rank=4, kv_bases="/nonexistent/m.npz"), "config.model.kv_bases='/nonexistent/m.npz' is not a file; "
                                                     "expected a MatryoshkaKV file"),
    (dict(kv_rank=4, kv_bases="WRONG"), "does not match config.model: layer_0/key_mean has shape (2, 4) in the "
                                        "file, (2, 8) in the model"),
    (dict(kv_bases="x.npz"), "config.model.kv_bases='x.npz' must be '' or the path of a MatryoshkaKV file"),
])
def test_missing_or_mismatched_bases_are_one_line(run, tmp_path, fields, message):
    corpus_dir, workdir, _, _ = run
    if fields.get("kv_bases") == "WRONG":
        wrong = str(tmp_path / "wrong.npz")
        K = FIELDS["num_kv_heads"]
        subtree = {f"layer_{i}": {"attention": {"matryoshka_kv": {
            "key_skew": np.zeros((K, 4, 4)), "key_mean": np.zeros((K, 4)), "value_skew": np.zeros((K, 4, 4)),
            "value_mean": np.zeros((K, 4))}}} for i in range(2)}
        matryoshka_pca.save(wrong, subtree)
        fields = dict(fields, kv_bases=wrong)
    with pytest.raises(InputError) as error:
        evaluate.evaluate(eval_config(corpus_dir, **fields), workdir)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


# The rate search.

@functools.cache
def lopsided_model():
    """(model, params with PCA bases, calibration batches): KV head 1 of every layer has small keys and values, so
    its units matter less than head 0's and a good search lowers them first."""
    params = random_params(seed=2, scale=0.3)
    for i in range(FIELDS["num_layers"]):
        attention = params[f"layer_{i}"]["attention"]
        for name in ("key_kernel", "value_kernel"):
            attention[name] = attention[name].at[:, 1].multiply(0.05)
    model = Model(Config(**FIELDS, kv_rank=H))
    batches = [(jax.random.randint(jax.random.key(s), (4, 16), 0, FIELDS["vocab_size"]), np.array([16, 16, 9, 3]))
               for s in (3, 4)]
    stats = sum((matryoshka_pca.moments(model, params, t, n) for t, n in batches),
                matryoshka_pca.Moments.zeros(model.config))
    return model, matryoshka_pca.merged(params, matryoshka_pca.pca_params(stats)), batches


def test_traced_ranks_equal_static_ones():
    model, params, batches = lopsided_model()
    key_ranks, value_ranks = (8, 2, 5, 1), (3, 8, 1, 6)
    static = Model(Config(**FIELDS, kv_rank=H, kv_key_ranks=key_ranks, kv_value_ranks=value_ranks))
    ranks = {f"layer_{i}": {"attention": {"matryoshka_kv": {"key_ranks": jnp.asarray(key_ranks[2 * i:2 * i + 2]),
                                                            "value_ranks": jnp.asarray(value_ranks[2 * i:2 * i + 2])}}}
             for i in range(2)}
    tokens_BT = batches[0][0]
    traced_BTV, _ = jax.jit(model.apply)({"params": params, matryoshka_kv.RANKS: ranks}, tokens_BT)
    static_BTV, _ = jax.jit(static.apply)({"params": params}, tokens_BT)
    np.testing.assert_allclose(traced_BTV, static_BTV, atol=1e-6)


@functools.cache
def searched(budget, step):
    model, params, batches = lopsided_model()
    return matryoshka_rates.search(model, params, batches, budget, step)


def test_the_search_beats_uniform_ranks_at_the_same_budget():
    model, params, batches = lopsided_model()
    result = searched(0.5, 1)
    uniform = (H // 2,) * 4
    assert sum(result.key_ranks) + sum(result.value_ranks) == sum(uniform) * 2  # the same budget exactly
    assert result.average == 0.5
    uniform_error = matryoshka_rates.hidden_state_error(model, params, batches, uniform, uniform)
    searched_error = matryoshka_rates.hidden_state_error(model, params, batches, result.key_ranks,
                                                         result.value_ranks)
    assert searched_error == pytest.approx(result.error, rel=1e-5)
    assert searched_error < 0.5 * uniform_error, (searched_error, uniform_error)
    # Head 1 (the small one) gives up more rank than head 0 in every layer.
    for ranks in (result.key_ranks, result.value_ranks):
        assert ranks[1] < ranks[0] and ranks[3] < ranks[2]
    full = matryoshka_rates.hidden_state_error(model, params, batches, (H,) * 4, (H,) * 4)
    assert full < 1e-9


def test_the_search_is_deterministic_and_meets_the_budget_at_the_step():
    model, params, batches = lopsided_model()
    first = matryoshka_rates.search(model, params, batches, 0.4, 2)
    assert first == searched(0.4, 2)
    units, total = 8, sum(first.key_ranks) + sum(first.value_ranks)
    assert total == 24  # the first multiple of the step at or under 0.4 * 8 units * 8
    assert 0.4 - 2 / (units * H) < first.average <= 0.4
    assert all(r % 2 == 0 and 2 <= r <= H for r in first.key_ranks + first.value_ranks)
    assert len(first.rounds) == (units * H - total) // 2
    assert first.kv_rank == max(first.key_ranks + first.value_ranks)
    Config(**FIELDS, **first.model_fields())  # the model config takes them


def test_one_trajectory_through_several_budgets_is_the_searches_one_by_one():
    model, params, batches = lopsided_model()
    at_half, at_quarter = matryoshka_rates.search_path(model, params, batches, (0.5, 0.25), 1)
    assert at_half == searched(0.5, 1)
    assert at_quarter.average == 0.25 and at_quarter.rounds[:len(at_half.rounds)] == at_half.rounds
    # Three units per round: a third of the rounds, each budget still met exactly (the last round takes only
    # what the budget needs), and the same answer on a second run.
    coarse = matryoshka_rates.search_path(model, params, batches, (0.5, 0.25), 1, units_per_round=3)
    assert coarse == matryoshka_rates.search_path(model, params, batches, (0.5, 0.25), 1, units_per_round=3)
    assert [r.average for r in coarse] == [0.5, 0.25]
    assert coarse[0].error == pytest.approx(matryoshka_rates.hidden_state_error(
        model, params, batches, coarse[0].key_ranks, coarse[0].value_ranks), rel=1e-5)


def test_the_tool_writes_ranks_that_evaluation_and_benchmarks_read(run, tmp_path):
    corpus_dir, workdir, bases, _ = run
    config = eval_config(corpus_dir, kv_bases=bases)
    info = matryoshka_rates_tool.build(config, workdir, budgets=0.75, step=2, num_tokens=96)
    assert info["path"] == os.path.join(workdir, "matryoshka_rates.json")
    fields = matryoshka_rates.load(info["path"])
    assert fields == info["result"].model_fields() and info["result"].average == 0.75
    results = evaluate.evaluate(eval_config(corpus_dir, kv_bases=bases, **fields), workdir)
    assert np.isfinite(results["validation"]["loss"])
    _, model, _, _ = superposed_benchmark.load_model("", workdir, dict(FIELDS, kv_bases=bases, **fields))
    assert model.config.kv_key_ranks == fields["kv_key_ranks"]


@pytest.mark.parametrize("budget, step, message", [
    (0.0, 1, "--budget=0.0 must be a number in (0, 1]"),
    (1.5, 1, "--budget=1.5 must be a number in (0, 1]"),
    (float("nan"), 1, "--budget=nan must be a number in (0, 1]"),
    (0.5, 3, "--rank_step=3 must be a positive integer dividing config.model.head_dim=8"),
    (0.5, 0, "--rank_step=0 must be a positive integer dividing"),
    (0.2, 4, "--budget=0.2 is below --rank_step / config.model.head_dim = 4/8"),
])
def test_bad_budget_or_step_is_one_line(budget, step, message):
    model, params, batches = lopsided_model()
    with pytest.raises(InputError) as error:
        matryoshka_rates.search(model, params, batches, budget, step)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_no_calibration_text_or_no_bases_is_one_line(run, tmp_path):
    model, params, batches = lopsided_model()
    with pytest.raises(InputError, match="calibration batches held 0 tokens") as error:
        matryoshka_rates.search(model, params, [(batches[0][0], np.zeros(4, np.int32))], 0.5, 1)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="the parameters have no MatryoshkaKV bases"):
        matryoshka_rates.search(model, matryoshka_pca.base_params(params), batches, 0.5, 1)
    corpus_dir, workdir, bases, _ = run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.py").write_text("")
    with pytest.raises(InputError) as error:
        matryoshka_rates_tool.build(eval_config(empty, kv_bases=bases), workdir, 0.5, 0, 64)
    assert f"config.data.corpus={str(empty)!r}" in str(error.value) and "\n" not in str(error.value)
    for text, message in (("{", "is not a rate-search result"), (None, "is not a file")):
        path = tmp_path / "rates.json"
        if text is not None:
            path.write_text(text)
        with pytest.raises(InputError, match=message) as error:
            matryoshka_rates.load(str(path if text else tmp_path / "missing.json"))
        assert "\n" not in str(error.value)
