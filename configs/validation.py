"""Every config value checked at start, before anything is built or written: train.py and evaluate.py call
`validate` right after the mesh is laid out. Each failure is one InputError line naming the key, the value and what
is allowed (configs/cli.py prints it and exits with status 2).

The model family checks its own fields (its Config, via models.registry), each evaluator its own section
(evaluators/), and this module the rest and how the parts fit together: sequence length and the model's positions,
batch and the data-parallel devices, parameters and the mesh axes that shard them, the tokenizer and the
vocabulary, kernels and the backend.
"""

import math

import flax.linen as nn
import jax
import ml_collections

import evaluators
from data import corpus, image_pipeline, jacobi_trajectories, tokenizer as tokenizer_lib
from errors import InputError, checks
from models import registry
from pallas_kernels import low_rank_decode_attention
from parallel import mesh as mesh_lib


def validate(config: ml_collections.ConfigDict, *, mesh, workdir: str, training: bool) -> None:
    checks.integer("config.seed", config.seed, minimum=0)
    model = registry.build(config.model)
    _kernels_fit_backend(config.model)
    _data(config.data, config.model)
    if training:
        _training_data(config.data, config.model, model)
        _optimizer(config.optimizer)
        _train(config.train)
        evaluators.validate(config.train.evaluators, config, "config.train.evaluators")
    evaluators.validate(config.evaluate.run, config, "config.evaluate.run")
    rules = mesh_lib.axis_rules(config)
    _batch_fits_mesh(config.data.global_batch_size, mesh, rules)
    _params_fit_mesh(model, mesh, rules)
    tokenizer_lib.existing_tokenizer(config.data, workdir, config.model.vocab_size)


def _training_data(data, model_config, model) -> None:
    """The batches train.py makes are the ones the model's loss reads."""
    if not isinstance(data.trajectories, str):
        raise InputError(f"config.data.trajectories={data.trajectories!r} must be a directory or ''")
    images = data.corpus == corpus.SHAPES_WORLD
    made = "jacobi_trajectories" if data.trajectories else image_pipeline.BATCH_FORMAT if images else "text"
    if model.batch_format != made:
        wanted = {"text": "config.data.trajectories='' and a text corpus",
                  "jacobi_trajectories": "config.data.trajectories set to a directory of Jacobi trajectories",
                  image_pipeline.BATCH_FORMAT: f"config.data.corpus={corpus.SHAPES_WORLD!r}"}.get(model.batch_format,
                                                                                                 "another pipeline")
        raise InputError(f"config.model.name={model_config.name!r} trains on {model.batch_format} batches, which need "
                         f"{wanted} (config.data.corpus={data.corpus!r}, config.data.trajectories="
                         f"{data.trajectories!r})")
    if data.trajectories:
        jacobi_trajectories.check(data)
    if images:
        checks.integer("config.data.caption_tokens", data.caption_tokens, minimum=2)


def _data(data, model) -> None:
    for name, minimum in (("seq_len", 1), ("global_batch_size", 1), ("tokenizer_train_bytes", 1),
                          ("shuffle_windows", 1), ("max_files", 0), ("num_shards", 0), ("num_workers", 0),
                          ("shuffle_seed", 0)):
        checks.integer(f"config.data.{name}", data[name], minimum=minimum)
    if data.seq_len > model.max_seq_len:
        raise InputError(f"config.data.seq_len={data.seq_len} exceeds config.model.max_seq_len={model.max_seq_len}, "
                         "the longest position the model is set up for")
    checks.number("config.data.validation_fraction", data.validation_fraction, above=0, below=1)
    for name in ("corpus", "file_glob", "text_key", "train_split", "validation_split"):
        if not isinstance(data[name], str) or not data[name]:
            raise InputError(f"config.data.{name}={data[name]!r} must be a non-empty string")
    process_count = jax.process_count()
    if data.global_batch_size % process_count:
        raise InputError(f"config.data.global_batch_size={data.global_batch_size} must be a multiple of the "
                         f"{process_count} processes")
    if data.num_shards and (data.num_shards % process_count or data.global_batch_size % data.num_shards):
        raise InputError(f"config.data.num_shards={data.num_shards} must be a multiple of the {process_count} "
                         f"processes and divide config.data.global_batch_size={data.global_batch_size}")


def _optimizer(opt) -> None:
    checks.number("config.optimizer.learning_rate", opt.learning_rate, minimum=0)
    checks.integer("config.optimizer.warmup_steps", opt.warmup_steps, minimum=0)
    checks.number("config.optimizer.min_learning_rate_ratio", opt.min_learning_rate_ratio, minimum=0, maximum=1)
    checks.number("config.optimizer.weight_decay", opt.weight_decay, minimum=0)
    checks.number("config.optimizer.b1", opt.b1, minimum=0, below=1)
    checks.number("config.optimizer.b2", opt.b2, minimum=0, below=1)
    checks.number("config.optimizer.eps", opt.eps, above=0)
    checks.number("config.optimizer.grad_clip_norm", opt.grad_clip_norm, above=0)


def _train(train) -> None:
    for name, minimum in (("num_steps", 1), ("log_every", 1), ("checkpoint_every", 1), ("keep_checkpoints", 1),
                          ("stop_at_step", 0), ("evaluate_every", 0)):
        checks.integer(f"config.train.{name}", train[name], minimum=minimum)
    checks.number("config.train.peak_flops_per_device", train.peak_flops_per_device, minimum=0)


def _batch_fits_mesh(global_batch_size: int, mesh, rules) -> None:
    axes = jax.tree.leaves(nn.logical_to_mesh_axes(("act_batch",), rules)[0])
    ways = math.prod(mesh.shape[axis] for axis in axes)
    if global_batch_size % ways:
        raise InputError(f"config.data.global_batch_size={global_batch_size} must be a multiple of the {ways} "
                         f"devices of the mesh axes {', '.join(axes)} that split the batch (config.mesh)")


def _params_fit_mesh(model, mesh, rules) -> None:
    """Every parameter dimension divides by the mesh axes its logical name maps to (jit refuses uneven shards)."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.example_inputs()))["params"]
    specs = nn.get_partition_spec(boxed)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    shapes = jax.tree.leaves(mesh_lib.strip_logical_names(boxed))
    for (path, spec), shape in zip(flat_specs, shapes):
        for size, name, mesh_axes in zip(shape.shape, spec, nn.logical_to_mesh_axes(spec, rules)):
            ways = math.prod(mesh.shape[axis] for axis in jax.tree.leaves(mesh_axes))
            if size % ways:
                where = jax.tree_util.keystr(path, simple=True, separator="/")
                raise InputError(f"parameter {where} has {size} entries along {name!r}, which does not divide by the "
                                 f"{ways} devices of mesh axes {mesh_axes} (config.mesh); change the model size or "
                                 "the mesh")


def _kernels_fit_backend(model) -> None:
    backend = jax.default_backend()
    if model.softmax_implementation == "cudnn" and backend != "gpu":
        raise InputError(f"config.model.softmax_implementation='cudnn' needs a GPU; this run is on {backend}")
    if model.softmax_implementation == "splash" and backend == "gpu":
        raise InputError("config.model.softmax_implementation='splash' is a TPU kernel; on a GPU choose 'cudnn'")
    uses_pallas_lightning = "lightning" in model.mixer_pattern and model.lightning_implementation == "pallas"
    block = model.lightning_block_size
    if uses_pallas_lightning and backend == "gpu" and (block < 16 or block & (block - 1)):
        raise InputError(f"config.model.lightning_block_size={block} must be a power of two >= 16 for the Pallas "
                         "lightning kernel on GPU (Triton)")
    kv_rank = model.get("kv_rank", 0)
    if kv_rank and model.softmax_implementation == "pallas" and "softmax" in model.mixer_pattern:
        low_rank_decode_attention.check_rank(kv_rank, "gpu" if backend == "gpu" else "tpu", compiled=backend != "cpu",
                                             key="config.model.kv_rank")
