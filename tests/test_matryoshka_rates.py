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
from models import matryoshka_pca
from models.llama import Config, Model

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
