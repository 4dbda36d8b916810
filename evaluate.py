"""Evaluates the latest checkpoint of a workdir on whatever devices are present.

  python evaluate.py --config=configs/lm.py:tiny --workdir=workdirs/tiny

Runs the evaluators named in config.evaluate.run (evaluators/: validation loss, perplexity and bits per byte;
completions of code prompts with each configured sampler; Superposed Decoding against nucleus and greedy; Jacobi
decoding's counts; images of held-out prompts scored by GenEval's rules, with PNG grids), prints their summaries
and writes everything to WORKDIR/eval_results.json.
"""

import json
import os

import jax
import ml_collections

import evaluators
from checkpoints import init_from, restore
from configs import cli, validation
from data import corpus, tokenizer as tokenizer_lib
from models import registry
from parallel import distributed, mesh as mesh_lib


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the workdir's latest checkpoint, or the `config.init_from` checkpoint when it has none."""
    config, _ = init_from.resolve(config)
    distributed.initialize(config.distributed)
    mesh = mesh_lib.make_mesh_for_present_devices(config.mesh)
    rules = mesh_lib.axis_rules(config)
    validation.validate(config, mesh=mesh, workdir=workdir, training=False)

    # ---------------------------------------------------------------------------------------------------------
    # Parameters: restored onto this machine's mesh, whatever mesh wrote them.
    # ---------------------------------------------------------------------------------------------------------
    # With MatryoshkaKV, bases the checkpoint lacks come from config.model.kv_bases (checkpoints/restore.py).
    model = registry.build(config.model)
    abstract_params, param_shardings = mesh_lib.sharded_abstract_params(model, mesh, rules)
    params, step, source = restore.params(config, workdir, abstract_params, param_shardings)

    # ---------------------------------------------------------------------------------------------------------
    # The evaluators, in the order config.evaluate.run lists them.
    # ---------------------------------------------------------------------------------------------------------
    sources = corpus.load_corpus(config.data)
    tokenizer = tokenizer_lib.load_or_train_tokenizer(config.data, workdir, sources["train"], config.model.vocab_size)
    context = evaluators.Context(config, workdir, model, tokenizer, sources, mesh, rules)
    results = {"step": step, "checkpoint": source}
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
