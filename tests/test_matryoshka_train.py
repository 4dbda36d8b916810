"""MatryoshkaKV training (models/matryoshka_distill.py, configs/matryoshka_kv.py): the loss terms against numpy, the
rank schedule, gradients only into the bases, one-line errors, and train.py started from a Llama workdir plus a PCA
file: the base weights bit-identical after training, the bases changed and orthogonal, the KL at a lower rank down."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
from test_matryoshka_kv import TINY, base_params, tokens, with_random_bases
from test_matryoshka_rates import H as MKV_H, eval_config as mkv_eval_config, run  # noqa: F401  (run: a fixture)
from test_train import data_dir, small_config  # noqa: F401  (data_dir is a fixture)

import evaluate
import train
from checkpoints import init_from, restore
from checkpoints.huggingface.export import export_hf
from configs import matryoshka_kv as matryoshka_config
from data import corpus, pipeline
from errors import InputError
from models import matryoshka_distill, matryoshka_kv, matryoshka_pca, registry

SUBTREE = matryoshka_pca.SUBTREE


def distill_config(**fields):
    return matryoshka_distill.Config(**{**TINY, "kv_rank": TINY["head_dim"], **fields})


def numpy_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_terms_equal_a_numpy_computation(temperature):
    rng = np.random.default_rng(0)
    teacher, student = (3 * rng.standard_normal((2, 5, 11)) for _ in range(2))
    targets = rng.integers(0, 11, (2, 5))
    cfg = distill_config(kl_weight=0.4, ce_weight=0.6, temperature=temperature)
    loss, metrics = matryoshka_distill.distillation_loss(cfg, jnp.asarray(teacher, jnp.float32),
                                                         jnp.asarray(student, jnp.float32), jnp.asarray(targets))
    log_p_t, log_p_s = numpy_log_softmax(teacher / temperature), numpy_log_softmax(student / temperature)
    kl = (np.exp(log_p_t) * (log_p_t - log_p_s)).sum(-1).mean() * temperature ** 2
    ce = -np.take_along_axis(numpy_log_softmax(student), targets[..., None], axis=-1).mean()
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["next_token_loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.4 * kl + 0.6 * ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], loss)
    assert matryoshka_distill.Config.kl_weight == 0.25 and matryoshka_distill.Config.ce_weight == 0.75


@pytest.mark.parametrize("fields, schedule", [({}, (2, 4, 6, 8)), ({"rank_step": 4}, (4, 8)),
                                              ({"kv_rank": 7}, (2, 4, 6, 7))])
def test_ranks_are_drawn_from_the_schedule_and_include_full_rank(fields, schedule):
    cfg = distill_config(**fields)
    assert cfg.rank_schedule == schedule
    draws = jax.jit(jax.vmap(lambda key: matryoshka_distill.sample_ranks(cfg, key)))(
        jax.random.split(jax.random.key(0), 400))
    assert sorted(draws) == [f"layer_{i}" for i in range(TINY["num_layers"])]
    seen = []
    for layer in draws.values():
        for kind in ("key_ranks", "value_ranks"):
            ranks = np.asarray(layer["attention"][SUBTREE][kind])
            assert ranks.shape == (400, TINY["num_kv_heads"]) and ranks.dtype == np.int32
            seen.append(ranks)
            assert set(np.unique(ranks)) == set(schedule)  # every rank of the schedule, full rank included
    seen = np.stack(seen)
    counts = np.array([(seen == r).mean() for r in schedule])
    np.testing.assert_allclose(counts, 1 / len(schedule), atol=0.03)  # uniform
    assert np.mean(seen[0] == seen[1]) < 0.5  # keys and values drawn independently


def test_only_the_bases_get_gradients_and_full_rank_equals_the_teacher():
    model = matryoshka_distill.Model(distill_config())
    params = with_random_bases(base_params())
    batch = {"tokens": tokens(batch=2, length=9)}
    (loss, metrics), grads = jax.jit(jax.value_and_grad(model.loss, has_aux=True))(params, batch, jax.random.key(0))
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        names = [entry.key for entry in path]
        if SUBTREE in names:
            continue
        np.testing.assert_array_equal(grad, 0, err_msg="/".join(names))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(
        {name: grads[name]["attention"][SUBTREE] for name in grads if name.startswith("layer_")}))
    # Without an rng the student is at its configured ranks: kv_rank = head_dim is the uncompressed model.
    _, full = jax.jit(model.loss)(params, batch)
    assert abs(float(full["kl"])) < 1e-4 < float(metrics["kl"])


@pytest.mark.parametrize("fields, message", [
    ({"rank_step": 3},
     r"config.model.rank_step=3 must be 0 \(head_dim // 4\) or a positive divisor of config.model.head_dim=8$"),
    ({"rank_step": -2}, "config.model.rank_step=-2"),
    ({"kl_weight": -0.1}, "config.model.kl_weight"),
    ({"ce_weight": -1.0}, "config.model.ce_weight"),
    ({"temperature": 0.0}, "config.model.temperature"),
    ({"kv_rank": 0}, "config.model.kv_rank=0: model matryoshka_distill trains MatryoshkaKV bases"),
])
def test_bad_fields_are_one_line_errors(fields, message):
    model_config = ml_collections.ConfigDict({"name": "matryoshka_distill", **TINY, "kv_rank": TINY["head_dim"],
                                              **fields})
    with pytest.raises(InputError, match=message) as error:
        registry.build(model_config)
    assert "\n" not in str(error.value)


def test_the_presets_build():
    for preset in matryoshka_config.PRESETS[:1]:  # smollm2 needs the GGUF wheel
        config = matryoshka_config.get_config(preset)
        assert config.optimizer.weight_decay == 0 and config.model.kv_bases.endswith("matryoshka_kv.npz")
        assert registry.build(config.model).config.rank_schedule == (8, 16, 24, 32)
        assert restore.uncompressed_config(config.model).name == "llama"


def first_batch(config, workdir):
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(workdir, "tokenizer.json"))
    sources = corpus.load_corpus(config.data)
    iterator = pipeline.train_iterator(config.data, tokenizer, sources["train"], seed=config.data.shuffle_seed,
                                       process_index=0, process_count=1)
    return {"tokens": jnp.asarray(next(iterator)["tokens"])}


@pytest.mark.slow
def test_training_from_a_llama_workdir_moves_only_the_bases_and_lowers_the_kl(data_dir, tmp_path):  # noqa: F811
    base_dir = str(tmp_path / "base")
    base_config = small_config(data_dir, num_steps=2, checkpoint_every=2)
    train.train_and_evaluate(base_config, base_dir)
    base = init_from._workdir_params(base_dir, base_config.model)
    batch = first_batch(base_config, base_dir)
    base_model = registry.build(base_config.model)
    stats = matryoshka_pca.moments(base_model, base, batch["tokens"])
    kv_bases = os.path.join(base_dir, "matryoshka_kv.npz")
    matryoshka_pca.save(kv_bases, matryoshka_pca.pca_params(stats), stats)

    config = small_config(data_dir, num_steps=3, checkpoint_every=3)
    config.init_from = f"workdir:{base_dir}"
    config.model.update(name="matryoshka_distill", kv_rank=16, kv_bases=kv_bases, kl_weight=1.0, ce_weight=0.0,
                        temperature=1.0, rank_step=0)  # pure KL (the reference's first objective): what is measured
    config.optimizer.update(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
    workdir = str(tmp_path / "distill")
    history = train.train_and_evaluate(config, workdir)
    assert [entry["step"] for entry in history] == [1, 2, 3] and all("kl" in entry for entry in history)

    model_config = ml_collections.ConfigDict(config.to_dict()["model"])
    trained = init_from._workdir_params(workdir, model_config)
    before = matryoshka_pca.merged(base, matryoshka_pca.load(kv_bases))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(base)[0],
                            jax.tree.leaves(matryoshka_pca.base_params(trained))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    for layer in ("layer_0", "layer_1"):
        for kind in ("key", "value"):
            old, new = (p[layer]["attention"][SUBTREE][f"{kind}_skew"] for p in (before, trained))
            assert float(jnp.abs(new - old).max()) > 1e-3
            u_KHH = matryoshka_kv.cayley(new)
            np.testing.assert_allclose(jnp.einsum("kij,kil->kjl", u_KHH, u_KHH),
                                       np.broadcast_to(np.eye(16), u_KHH.shape), atol=1e-5)

    model_config.kv_rank = 8
    reduced = registry.build(model_config)
    loss_fn = jax.jit(reduced.loss)
    kl_before, kl_after = (float(loss_fn(p, batch)[1]["kl"]) for p in (before, trained))
    assert kl_after < kl_before, (kl_before, kl_after)


def test_evaluation_from_a_hugging_face_checkpoint_and_the_bases_file(run, tmp_path):  # noqa: F811
    """hf: loads into this family as the uncompressed Llama (checkpoints/restore.py), the bases come from the file,
    and the validation evaluator (rng None) scores the configured ranks: at full rank the KL is 0, so the loss is
    ce_weight times the base model's next-token loss."""
    corpus_dir, workdir, bases, params = run
    base = evaluate.evaluate(mkv_eval_config(corpus_dir), workdir)["validation"]["loss"]  # writes the tokenizer
    source = export_hf(params, mkv_eval_config(corpus_dir).model, os.path.join(workdir, "tokenizer.json"),
                       str(tmp_path / "hf"))
    config = mkv_eval_config(corpus_dir, name="matryoshka_distill", kv_rank=MKV_H, kv_bases=bases, kl_weight=0.25,
                             ce_weight=0.75)
    config.init_from = f"hf:{source}"
    results = evaluate.evaluate(config, str(tmp_path / "eval"))
    assert results["validation"]["loss"] == pytest.approx(0.75 * base, rel=1e-4)
