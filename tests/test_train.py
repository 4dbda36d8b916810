"""train.py end to end on a small slice of the default corpus: resume, sharding, restore, errors, divergence."""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import evaluate
import train
from checkpoints.manager import Checkpoints
from configs.lm import get_config
from data import corpus
from errors import InputError, TrainingDiverged
from parallel import mesh as mesh_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_config(data_dir, **train_overrides):
    """configs/lm.py:tiny shrunk to seconds per run: 40 stdlib files, a 2-layer model, 32-token windows."""
    config = get_config("tiny")
    config.data.update(max_files=40, validation_fraction=0.25, tfds_data_dir=str(data_dir), seq_len=32,
                       global_batch_size=8, num_shards=2, shuffle_windows=256)
    config.model.update(vocab_size=300, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16,
                        mlp_dim=128)
    config.optimizer.update(learning_rate=1e-2, warmup_steps=2)
    config.train.update({**dict(num_steps=6, log_every=1, checkpoint_every=3, evaluate_every=0), **train_overrides})
    config.evaluate.validation.num_batches = 2
    config.evaluate.samples.update(num_prompts=2, max_new_tokens=8)
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The corpus is built once; every test reads the same array_record files."""
    path = tmp_path_factory.mktemp("tfds")
    corpus.load_corpus(small_config(path).data)
    return path


def losses(history):
    return [entry["loss"] for entry in history if "loss" in entry]


def on_devices(monkeypatch, count):
    """Makes train.py and evaluate.py see only the first `count` of the 8 fake devices."""
    make_mesh = mesh_lib.make_mesh
    monkeypatch.setattr(mesh_lib, "make_mesh",
                        lambda mesh_config, devices=None: make_mesh(mesh_config, jax.devices()[:count]))


def test_interrupted_and_resumed_run_equals_uninterrupted_run(data_dir, tmp_path):
    uninterrupted = train.train_and_evaluate(small_config(data_dir), str(tmp_path / "straight"))
    assert len(uninterrupted) == 6 and uninterrupted[-1]["loss"] < uninterrupted[0]["loss"]

    workdir = str(tmp_path / "resumed")
    first = train.train_and_evaluate(small_config(data_dir, stop_at_step=4), workdir)
    assert Checkpoints(workdir).all_steps() == [3, 4]  # every 3 steps, and where it stopped
    second = train.train_and_evaluate(small_config(data_dir), workdir)
    assert [entry["step"] for entry in second] == [5, 6]
    assert losses(first + second) == losses(uninterrupted)  # exactly: same data order, same arithmetic


def test_sharded_train_steps_match_one_device(data_dir, tmp_path, monkeypatch):
    config = small_config(data_dir, num_steps=3)
    config.mesh.update(data=2, fsdp=1, tensor=4)
    sharded = train.train_and_evaluate(config, str(tmp_path / "mesh2x4"))
    on_devices(monkeypatch, 1)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    single = train.train_and_evaluate(config, str(tmp_path / "one_device"))
    np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-5)


@pytest.mark.slow
def test_checkpoint_written_on_8_devices_restores_and_evaluates_on_1(data_dir, tmp_path, monkeypatch):
    config = small_config(data_dir, num_steps=3)
    config.mesh.update(data=1, fsdp=4, tensor=2)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)

    on_devices(monkeypatch, 1)
    results = evaluate.evaluate(config, workdir)
    assert results["step"] == 3
    validation = results["validation"]
    assert validation["tokens"] == 2 * 8 * 32
    assert math.isclose(validation["perplexity"], math.exp(validation["loss"]))
    assert 0 < validation["bits_per_byte"] < validation["loss"] / math.log(2)  # byte-level BPE: > 1 byte/token
    assert len(results["samples"]["greedy"]) == 2
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text()) == json.loads(json.dumps(results))


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(small_config(data_dir, num_steps=3), workdir)

    config = small_config(data_dir, num_steps=6, checkpoint_every=1)
    config.optimizer.learning_rate = 1e38  # the update of step 4 overflows every parameter
    with pytest.raises(TrainingDiverged,
                       match=r"non-finite .*param_norm.* at step 4; .*last good checkpoint is step 3"):
        train.train_and_evaluate(config, workdir)
    assert Checkpoints(workdir).all_steps() == [3]
    results = evaluate.evaluate(small_config(data_dir), workdir)
    assert results["step"] == 3 and np.isfinite(results["validation"]["loss"])


def run_cli(script, *args, env=None):
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_gives_one_line_errors(data_dir, tmp_path):
    base = ["--config=configs/lm.py:tiny", f"--workdir={tmp_path / 'run'}"]
    assert_one_line_error(run_cli("train.py", *base, "--config.model.num_layerz=3"),
                          "--config.model.num_layerz", "num_layers")
    assert_one_line_error(run_cli("train.py", *base, "--config.model.num_layers=two"), "--config.model.num_layers")
    assert_one_line_error(run_cli("train.py", *base, f"--config.data.corpus={tmp_path / 'missing'}"),
                          "config.data.corpus", "missing")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("train.py", *base, f"--config.data.corpus={tmp_path / 'empty'}"),
                          "config.data.corpus", "empty")

    # A checkpoint of a 2-layer model does not restore into a 3-layer one; the checkpoint is left as it was.
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(small_config(data_dir, num_steps=1), workdir)
    config = small_config(data_dir, num_steps=2)
    config.model.num_layers = 3
    with pytest.raises(InputError, match=r"does not match config.model: .*layer_2") as error:
        train.train_and_evaluate(config, workdir)
    assert "\n" not in str(error.value)
    assert Checkpoints(workdir).all_steps() == [1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(data_dir, tmp_path, monkeypatch):
    """The multi-host path of a TPU pod, for real: two processes joined by jax.distributed over localhost."""
    common = ["--config=configs/lm.py:tiny", f"--workdir={tmp_path / 'two'}"] + [
        f"--config.{key}={value}" for key, value in [
            ("data.max_files", 40), ("data.validation_fraction", 0.25), ("data.tfds_data_dir", data_dir),
            ("data.seq_len", 32), ("data.global_batch_size", 8), ("data.num_shards", 2),
            ("data.shuffle_windows", 256),
            ("model.vocab_size", 300), ("model.num_layers", 2), ("model.embed_dim", 64), ("model.num_heads", 4),
            ("model.num_kv_heads", 4), ("model.head_dim", 16), ("model.mlp_dim", 128),
            ("optimizer.learning_rate", 1e-2), ("optimizer.warmup_steps", 2), ("train.num_steps", 4),
            ("train.log_every", 1), ("train.checkpoint_every", 2), ("train.evaluate_every", 0),
            ("distributed.initialize", True),
            ("distributed.coordinator_address", f"127.0.0.1:{free_port()}"), ("distributed.num_processes", 2)]]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    processes = [subprocess.Popen([sys.executable, "train.py", *common, f"--config.distributed.process_id={i}"],
                                  cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]

    on_devices(monkeypatch, 2)
    one = train.train_and_evaluate(small_config(data_dir, num_steps=4, checkpoint_every=2), str(tmp_path / "one"))
    assert [entry["step"] for entry in two] == [1, 2, 3, 4]
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    assert Checkpoints(str(tmp_path / "two")).all_steps() == [2, 4]


def test_training_runs_its_evaluators_every_n_steps(data_dir, tmp_path):
    """train_and_evaluate evaluates: config.train.evaluators every evaluate_every steps (and at the end) into the
    metrics stream, with the numbers evaluate.py gives for the same parameters."""
    workdir = str(tmp_path / "run")
    config = small_config(data_dir, num_steps=5, checkpoint_every=5, evaluate_every=2)
    history = train.train_and_evaluate(config, workdir)
    evaluations = [entry for entry in history if "eval/validation/loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4, 5]
    assert evaluations[-1]["eval/validation/loss"] < evaluations[0]["eval/validation/loss"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [entry for entry in logged if "eval/validation/loss" in entry] == evaluations
    config.evaluate.run = ("validation",)
    final = evaluate.evaluate(config, workdir)["validation"]
    assert final["loss"] == pytest.approx(evaluations[-1]["eval/validation/loss"], rel=1e-5)
    assert final["bits_per_byte"] == pytest.approx(evaluations[-1]["eval/validation/bits_per_byte"], rel=1e-5)


@pytest.mark.slow
def test_superposed_evaluation_end_to_end(data_dir, tmp_path, capsys):
    """tools/build_ngrams.py on a trained workdir, then evaluate.py's Superposed Decoding evaluator: Superposed
    drafts against nucleus x k and greedy, scored."""
    from tools import build_ngrams

    workdir = str(tmp_path / "run")
    config = small_config(data_dir, num_steps=3)
    config.evaluate.run = ("superposed",)
    train.train_and_evaluate(config, workdir)
    assert evaluate.evaluate(config, workdir)["superposed"] == {
        "skipped": f"no n-gram store at {tmp_path / 'run' / 'ngrams.npz'}; build it with: "
                   "python tools/build_ngrams.py --config=CONFIG --workdir=WORKDIR"}
    info = build_ngrams.build(config, workdir)
    assert info["num_tokens"] > 0 and os.path.isfile(os.path.join(workdir, "ngrams.npz"))
    config.evaluate.superposed.update(num_prompts=4, new_tokens=6, long_new_tokens=8)
    section = evaluate.evaluate(config, workdir)["superposed"]
    assert section["protocol"]["prompts"] == 4
    k = config.evaluate.superposed.num_drafts
    for setting, new_tokens in (("short", 6), ("long", 8)):
        assert section[setting]["new_tokens"] == new_tokens
        table = section[setting]["table"]
        assert set(table) == {"superposed", f"nucleus_x{k}", "greedy"}
        assert 1 < table["superposed"]["drafts_per_prompt"] <= k and table["greedy"]["drafts_per_prompt"] == 1
        for row in table.values():
            assert np.isfinite(row["perplexity_best_of_k"]) and row["perplexity_best_of_k"] >= 1
            assert all(0 <= row[f"P@{j}"] <= 1 for j in range(1, k + 1))
        # The best of k drafts is at least as good as their mean.
        assert table["superposed"]["perplexity_best_of_k"] <= table["superposed"]["perplexity_mean"]
    assert "Superposed Decoding, 6 new tokens, 4 prompts:" in capsys.readouterr().out
