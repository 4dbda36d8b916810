"""Evaluates the latest checkpoint of a workdir on whatever devices are present.

  python evaluate.py --config=configs/lm.py:tiny --workdir=workdirs/tiny

Runs the evaluators named in config.evaluate.run (evaluators/: validation loss, perplexity and bits per byte;
completions of code prompts with each configured sampler; Superposed Decoding against nucleus and greedy; Jacobi
decoding's counts), prints their summaries and writes everything to WORKDIR/eval_results.json.
"""

import json
import os

import jax
import ml_collections

import evaluators
from checkpoints import init_from
from checkpoints.manager import Checkpoints
from configs import cli, validation
from data import corpus, tokenizer as tokenizer_lib
from models import registry
from parallel import distributed, mesh as mesh_lib


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the workdir's latest checkpoint, or the `config.init_from` checkpoint when it has none."""
    config, init_checkpoint = init_from.resolve(config)
    distributed.initialize(config.distributed)
    mesh = mesh_lib.make_mesh_for_present_devices(config.mesh)
    rules = mesh_lib.axis_rules(config)
    validation.validate(config, mesh=mesh, workdir=workdir, training=False)

    # ---------------------------------------------------------------------------------------------------------
    # Parameters: restored onto this machine's mesh, whatever mesh wrote them.
    # ---------------------------------------------------------------------------------------------------------
    model = registry.build(config.model)
    abstract_params, param_shardings = mesh_lib.sharded_abstract_params(model, mesh, rules)
    checkpoints = Checkpoints(workdir)
    step = checkpoints.latest_step()
    if step is None and init_checkpoint:
        params = init_from.load_params(init_checkpoint, config.model, param_shardings)
    else:
        params = checkpoints.restore_params(abstract_params, step)
    checkpoints.close()

    # ---------------------------------------------------------------------------------------------------------
    # The evaluators, in the order config.evaluate.run lists them.
    # ---------------------------------------------------------------------------------------------------------
    sources = corpus.load_corpus(config.data)
    tokenizer = tokenizer_lib.load_or_train_tokenizer(config.data, workdir, sources["train"], config.model.vocab_size)
    context = evaluators.Context(config, workdir, model, tokenizer, sources, mesh, rules)
    results = {"step": step, "checkpoint": config.init_from if step is None else checkpoints.directory}
    print(f"step {step} of {results['checkpoint']}")
    for name in config.evaluate.run:
        evaluator = evaluators.build(name, context)
        results[name] = evaluator.run(params)
        evaluator.report(results[name])

    if jax.process_index() == 0:
        path = os.path.join(workdir, "eval_results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)  # A reader never sees half a file, and the old results survive a crash.
        print(f"results written to {path}")
    return results


if __name__ == "__main__":
    cli.main(lambda: evaluate(cli.CONFIG.value, cli.WORKDIR.value))
