"""Trains the model family that config.model.name names, sharded over every device of every process.

  python train.py --config=configs/lm.py:tiny --workdir=workdirs/tiny

Rerunning the same command resumes from the workdir's latest checkpoint with the same data order and losses.
The model family (config.model.name) supplies its loss, FLOPs and initial inputs (models/registry.py); the
evaluators in config.train.evaluators run every config.train.evaluate_every steps into the same metrics stream.
The sections below are meant to be edited in a fork; `train_and_evaluate(config, workdir)` is importable.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

import evaluators
from checkpoints import init_from, restore
from checkpoints.manager import Checkpoints
from checkpoints.preemption import PreemptionWatch
from configs import cli, validation
from data import corpus, image_pipeline, jacobi_trajectories, pipeline, tokenizer as tokenizer_lib
from errors import TrainingDiverged
from metrics import flops
from metrics.writer import MetricWriter
from models import registry
from parallel import distributed, mesh as mesh_lib


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup, cosine decay to a floor, and global-norm gradient clipping."""
    opt = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
        decay_steps=max(config.train.num_steps, opt.warmup_steps + 1),
        end_value=opt.learning_rate * opt.min_learning_rate_ratio)
    decay_matrices_only = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # not norms or biases
    optimizer = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                    mask=decay_matrices_only))
    return optimizer, schedule


def make_init_state(model, optimizer, seq_len: int):
    """The train state a run starts from: step 0, fresh parameters and optimizer state (boxed with logical names)."""
    def init_state(rng):
        params = model.init(rng, *model.example_inputs(1, seq_len))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

    return init_state


def make_train_step(model, optimizer, schedule, seed: int):
    """One step on a batch: the model's own loss, its gradient, the optimizer update, and the step's metrics."""
    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        (loss, metrics), grads = jax.value_and_grad(model.loss, has_aux=True)(state["params"], batch, rng)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
                   "learning_rate": schedule(state["step"])}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains until config.train.num_steps (or stop_at_step, or a preemption); returns the logged metrics."""
    # ---------------------------------------------------------------------------------------------------------
    # Devices and config: join the other processes, lay out the mesh, name how logical axes map onto it, and
    # check every config value before anything is built or written.
    # ---------------------------------------------------------------------------------------------------------
    config, init_checkpoint = init_from.resolve(config)
    distributed.initialize(config.distributed)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.axis_rules(config)
    validation.validate(config, mesh=mesh, workdir=workdir, training=True)
    process_index, process_count = jax.process_index(), jax.process_count()

    # ---------------------------------------------------------------------------------------------------------
    # Data: the corpus, its tokenizer (trained once, saved in the workdir) and a checkpointable iterator over
    # packed windows of it, or over Jacobi trajectories (config.data.trajectories) for consistency training, or
    # over captioned images (config.data.corpus "shapes_world") for the image model.
    # ---------------------------------------------------------------------------------------------------------
    sources = corpus.load_corpus(config.data)
    tokenizer = tokenizer_lib.load_or_train_tokenizer(config.data, workdir, sources["train"], config.model.vocab_size)
    hosts = dict(seed=config.data.shuffle_seed, process_index=process_index, process_count=process_count)
    if config.data.trajectories:
        data_iterator = jacobi_trajectories.train_iterator(config.data, **hosts)
    elif config.data.corpus == corpus.SHAPES_WORLD:
        data_iterator = image_pipeline.train_iterator(config.data, tokenizer, sources["train"], **hosts)
    else:
        data_iterator = pipeline.train_iterator(config.data, tokenizer, sources["train"], **hosts)

    # ---------------------------------------------------------------------------------------------------------
    # Model and optimizer.
    # ---------------------------------------------------------------------------------------------------------
    model = registry.build(config.model)
    optimizer, schedule = make_optimizer(config)
    seq_len = config.data.seq_len
    init_state = make_init_state(model, optimizer, seq_len)

    # ---------------------------------------------------------------------------------------------------------
    # Train state: shardings come from the logical names on the abstract state. Restore order: the workdir's
    # latest checkpoint, else config.init_from (fine-tuning), else parameters created directly sharded.
    # ---------------------------------------------------------------------------------------------------------
    abstract_state, state_shardings = mesh_lib.sharded_abstract(init_state, jax.random.key(config.seed), mesh=mesh,
                                                                rules=rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
        start_step = checkpoints.latest_step()
        if start_step is not None:
            state = checkpoints.restore(start_step, abstract_state, data_iterator)
        elif init_checkpoint:
            start_step = 0
            # config.init_from's parameters; with MatryoshkaKV, bases it lacks from config.model.kv_bases.
            params, _, _ = restore.params(config, "", abstract_state["params"], state_shardings["params"])
            state = {"step": jnp.zeros((), jnp.int32), "params": params,
                     "opt_state": jax.jit(optimizer.init, out_shardings=state_shardings["opt_state"])(params)}
        else:
            start_step = 0
            state = jax.jit(lambda rng: nn.meta.unbox(init_state(rng)),
                            out_shardings=state_shardings)(jax.random.key(config.seed))

    flops_per_token = model.flops_per_token(seq_len)
    peak_flops = flops.peak_flops_per_device(config.train.peak_flops_per_device)

    # ---------------------------------------------------------------------------------------------------------
    # The train step: one jitted function, state donated, shardings pinned on the way in and out.
    # ---------------------------------------------------------------------------------------------------------
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        train_step = jax.jit(make_train_step(model, optimizer, schedule, config.seed),
                             in_shardings=(state_shardings, batch_sharding),
                             out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))

    # ---------------------------------------------------------------------------------------------------------
    # Evaluators (evaluators/), run on the current parameters every config.train.evaluate_every steps.
    # ---------------------------------------------------------------------------------------------------------
    evaluate_every = config.train.evaluate_every
    context = evaluators.Context(config, workdir, model, tokenizer, sources, mesh, rules)
    periodic = {name: evaluators.build(name, context) for name in config.train.evaluators} if evaluate_every else {}

    def evaluate(step, params):
        scalars = {}
        for name, evaluator in periodic.items():
            scalars.update(evaluators.scalars(evaluator.run(params), f"eval/{name}"))
        writer.write(step, scalars)
        history.append({"step": step, **scalars})

    # ---------------------------------------------------------------------------------------------------------
    # The loop. Step t's metrics are read after step t+1 is dispatched, so the host never idles the devices;
    # a checkpoint is written only once its step's loss and norms are known to be finite.
    # ---------------------------------------------------------------------------------------------------------
    writer = MetricWriter(workdir)
    preemption = PreemptionWatch()
    history = []
    tokens_per_step = config.data.global_batch_size * seq_len
    last_log = {"time": time.perf_counter(), "step": start_step}
    progress = tqdm.tqdm(total=config.train.num_steps, initial=start_step, desc="train", unit="step",
                         disable=process_index != 0, dynamic_ncols=True)

    def report(step, metrics):
        metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
        bad = [name for name in ("loss", "grad_norm", "param_norm") if not np.isfinite(metrics[name])]
        if bad:
            checkpoints.wait_until_finished()
            raise TrainingDiverged(f"non-finite {', '.join(bad)} at step {step}; training stopped, the last good "
                                   f"checkpoint is step {checkpoints.latest_step()} in {checkpoints.directory}")
        if step % config.train.log_every == 0 or step == config.train.num_steps:
            elapsed = time.perf_counter() - last_log["time"]
            tokens_per_second = (step - last_log["step"]) * tokens_per_step / max(elapsed, 1e-9)
            metrics["tokens_per_second"] = tokens_per_second
            if peak_flops:
                metrics["mfu"] = tokens_per_second * flops_per_token / (peak_flops * jax.device_count())
            last_log.update(time=time.perf_counter(), step=step)
            writer.write(step, metrics)
            history.append({"step": step, **metrics})
            progress.set_postfix(loss=f"{metrics['loss']:.3f}")

    pending = None
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for step in range(start_step + 1, config.train.num_steps + 1):
                batch = jax.tree.map(lambda x: mesh_lib.global_batch(x, batch_sharding), next(data_iterator))
                state, metrics = train_step(state, batch)
                if pending:
                    report(*pending)
                pending = (step, metrics)
                progress.update(1)
                stopping = step == config.train.stop_at_step or preemption.reached(step)
                if step % config.train.checkpoint_every == 0 or step == config.train.num_steps or stopping:
                    report(*pending)
                    pending = None
                    checkpoints.save(state, data_iterator)
                if periodic and (step % evaluate_every == 0 or step == config.train.num_steps):
                    evaluate(step, state["params"])
                if stopping:
                    break
            if pending:
                report(*pending)
    finally:
        progress.close()
        preemption.close()
        checkpoints.wait_until_finished()
        checkpoints.close()
        writer.close()
    return history


if __name__ == "__main__":
    cli.main(lambda: train_and_evaluate(cli.CONFIG.value, cli.WORKDIR.value))
