"""Config checks at start (configs/validation.py): every bad value is one line naming the key, the value and what
is allowed, exit status 2, and nothing is written; every preset of every config file validates, builds its model
and lowers its train step (abstract arrays only, nothing allocated)."""

import importlib
import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import tokenizers

import train
from checkpoints import init_from
from configs import lm, validation
from data import corpus, jacobi_trajectories
from errors import InputError
from models import registry
from parallel import mesh as mesh_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(path.stem for path in (REPO / "configs").glob("*.py") if "def get_config" in path.read_text())


def presets(file: str) -> tuple:
    return getattr(importlib.import_module(f"configs.{file}"), "PRESETS", (None,))


def tiny_config():
    config = lm.get_config("tiny")
    config.model.update(vocab_size=300, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16,
                        mlp_dim=128)
    return config


BAD_VALUES = [  # (key, value, what the one line must say)
    ("model.num_heads", 7, "config.model.num_heads=7 must be a multiple of config.model.num_kv_heads=4"),
    ("model.num_kv_heads", 0, "config.model.num_kv_heads=0 must be an integer >= 1"),
    ("model.embed_dim", 0, "config.model.embed_dim=0 must be an integer >= 1"),
    ("model.head_dim", -1, "config.model.head_dim=-1 must be an integer >= 1"),
    ("model.dtype", "float64x", "config.model.dtype='float64x' is not one of 'float32', 'bfloat16', 'float16'"),
    ("model.remat", "some", "config.model.remat='some' is not one of 'none', 'full', 'dots'"),
    ("model.softmax_implementation", "flash", "config.model.softmax_implementation='flash' is not one of"),
    ("model.softmax_implementation", "cudnn", "config.model.softmax_implementation='cudnn' needs a GPU"),
    ("data.seq_len", 0, "config.data.seq_len=0 must be an integer >= 1"),
    ("data.seq_len", 4096, "config.data.seq_len=4096 exceeds config.model.max_seq_len=2048"),
    ("data.global_batch_size", 0, "config.data.global_batch_size=0 must be an integer >= 1"),
    ("data.global_batch_size", 12, "config.data.global_batch_size=12 must be a multiple of the 8 devices"),
    ("data.validation_fraction", 1.0, "config.data.validation_fraction=1.0 must be a finite number > 0 and < 1"),
    ("train.checkpoint_every", 0, "config.train.checkpoint_every=0 must be an integer >= 1"),
    ("train.num_steps", -1, "config.train.num_steps=-1 must be an integer >= 1"),
    ("optimizer.warmup_steps", -5, "config.optimizer.warmup_steps=-5 must be an integer >= 0"),
    ("optimizer.learning_rate", float("nan"), "config.optimizer.learning_rate=nan must be a finite number >= 0"),
    ("optimizer.b2", 1.0, "config.optimizer.b2=1.0 must be a finite number >= 0 and < 1"),
    ("mesh.tensor", 3, "config.mesh (data=-1, fsdp=1, tensor=3): 8 devices do not divide by the fixed sizes"),
    ("mesh.tensor", 8, "parameter embedding has 300 entries along 'vocab', which does not divide by the 8 devices"),
    ("evaluate.run", ("validation", "nope"), "config.evaluate.run lists 'nope', which is not an evaluator"),
    ("train.evaluators", ("samples", "x"), "config.train.evaluators lists 'x', which is not an evaluator"),
    ("evaluate.samples.samplers.nucleus.top_p", 2.0, "config.evaluate.samples.samplers.nucleus: sampling top_p"),
    ("evaluate.superposed.alpha", 1.5, "config.evaluate.superposed.alpha must be in [0, 1]"),
    ("evaluate.validation.num_batches", 0, "config.evaluate.validation.num_batches=0 must be an integer >= 1"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_value_is_one_line_and_nothing_is_written(key, value, message, tmp_path):
    config = tiny_config()
    section, _, field = key.rpartition(".")
    node = config
    for part in section.split("."):
        node = node[part]
    node[field] = value
    workdir = tmp_path / "run"
    with pytest.raises(InputError) as error:
        train.train_and_evaluate(config, str(workdir))
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not workdir.exists()


def test_tokenizer_larger_than_the_vocabulary_is_refused_before_writing(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["def f(x): return x"] * 4, trainer)
    tokenizer.save(str(workdir / "tokenizer.json"))
    config = tiny_config()
    config.model.vocab_size = 256
    with pytest.raises(InputError, match=r"config.model.vocab_size=256 is smaller than the \d+ tokens"):
        train.train_and_evaluate(config, str(workdir))
    assert sorted(os.listdir(workdir)) == ["tokenizer.json"]


def run_cli(script, *args):
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)


@pytest.mark.parametrize("script, flag, message", [
    ("train.py", "--config.model.num_heads=7", "config.model.num_heads=7 must be a multiple of"),
    ("train.py", "--config.optimizer.warmup_steps=-5", "config.optimizer.warmup_steps=-5 must be an integer >= 0"),
    ("evaluate.py", "--config.model.remat=some", "config.model.remat='some' is not one of"),
])
def test_command_line_exits_2_with_one_line(script, flag, message, tmp_path):
    result = run_cli(script, "--config=configs/lm.py:tiny", f"--workdir={tmp_path / 'run'}", flag)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("file, preset", [(file, preset) for file in CONFIG_FILES for preset in presets(file)])
def test_every_preset_validates_builds_and_lowers_a_train_step(file, preset, tmp_path):
    get_config = importlib.import_module(f"configs.{file}").get_config
    config = get_config() if preset is None else get_config(preset)
    B, L = config.data.global_batch_size, config.data.seq_len + 1
    shapes = {"tokens": (B, L)}
    dtypes = {}
    if config.data.corpus == corpus.SHAPES_WORLD:  # the image model's captioned images (data/image_pipeline.py)
        size = config.model.image_size
        shapes = {"text": (B, config.data.caption_tokens), "caption_tokens": (B,), "image": (B, size, size, 3)}
        dtypes = {"image": jnp.uint8}
    if config.data.trajectories:  # consistency training: its trajectories and its base model come from earlier runs
        W = config.trajectories.window
        config.data.trajectories = str(tmp_path / "trajectories")
        os.makedirs(config.data.trajectories)
        jacobi_trajectories.write_shard(config.data.trajectories, 0, [])
        (tmp_path / "trajectories" / jacobi_trajectories.INFO_FILE).write_text(json.dumps({"window": W}))
        shapes.update(states=(B, W, W), num_states=(B,), window_start=(B,), valid=(B,))
    # A workdir: base checkpoint (CLLM's, MatryoshkaKV training's) comes from an earlier run.
    config.init_from = "" if config.init_from.startswith("workdir:") else config.init_from
    config, _ = init_from.resolve(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.axis_rules(config)
    validation.validate(config, mesh=mesh, workdir=str(tmp_path), training=True)
    model = registry.build(config.model)
    optimizer, schedule = train.make_optimizer(config)
    init_state = train.make_init_state(model, optimizer, config.data.seq_len)
    abstract_state, state_shardings = mesh_lib.sharded_abstract(init_state, jax.random.key(0), mesh=mesh, rules=rules)
    batch = {key: jax.ShapeDtypeStruct(shape, dtypes.get(key, jnp.int32), sharding=mesh_lib.batch_sharding(mesh, rules))
             for key, shape in shapes.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jax.jit(train.make_train_step(model, optimizer, schedule, config.seed),
                          in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh, rules))).lower(
            abstract_state, batch)
    assert "stablehlo.dot_general" in lowered.as_text()
    # Every weight but the input embedding is a matmul: at least 6 FLOPs each per token.
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"]))
    embedding = config.model.vocab_size * config.model.embed_dim
    assert model.flops_per_token(config.data.seq_len) >= 6 * (num_params - embedding)
