"""MatryoshkaKV's per-head rate search (models/matryoshka_rates.py) on calibration text from config.data's train
split, into WORKDIR/matryoshka_rates.json.

  python tools/matryoshka_pca.py --config=configs/lm.py:tiny --workdir=workdirs/tiny        # the bases first
  python tools/matryoshka_rates.py --config=configs/lm.py:tiny --workdir=workdirs/tiny \\
      --config.model.kv_bases=workdirs/tiny/matryoshka_kv.npz --budget=0.5 [--rank_step=4] [--calibration_tokens=4096]

Several budgets (--budget=0.75,0.5,0.4,0.25) are one greedy trajectory, each written to
WORKDIR/matryoshka_rates_<budget>.json; --units_per_round=N lowers the N best units per round (the reference's
form: N times fewer rounds, each scoring every unit once), which a 100M-parameter model on a CPU needs.

The model is the workdir's latest checkpoint, else config.init_from (hf:DIR, gguf:FILE, workdir:DIR), restored as
evaluate.py does (checkpoints/restore.py: bases it lacks come from config.model.kv_bases), searched at
kv_rank = head_dim (config.model.kv_rank and the per-head ranks are ignored here). --rank_step=0 means head_dim / 8.
Documents are tokenized and cut into config.data.seq_len windows as tools/matryoshka_pca.py does. The JSON's
kv_rank, kv_key_ranks and kv_value_ranks are config.model fields: the tool prints them as flags, and
models.matryoshka_rates.load(path) returns them (e.g. for benchmarks/superposed.py's load_model).
"""

import contextlib
import os

import flax.linen as nn
import jax
import ml_collections
from absl import flags

from checkpoints import init_from, restore
from configs import cli
from errors import InputError, checks
from models import matryoshka_rates, registry
from parallel import mesh as mesh_lib
from tools import matryoshka_pca as pca_tool

BUDGETS = flags.DEFINE_list("budget", ["0.5"], "Target average rank / head_dim, in (0, 1]; several: one file each.")
STEP = flags.DEFINE_integer("rank_step", 0, "Rank decrement per round, dividing head_dim; 0 = head_dim / 8.")
NUM_TOKENS = flags.DEFINE_integer("calibration_tokens", 4096,
                                  "Calibration tokens the hidden-state error is measured on.")
UNITS_PER_ROUND = flags.DEFINE_integer("units_per_round", 1, "Units lowered per round of the greedy search.")


def output_path(workdir: str, budget: float, several: bool) -> str:
    return os.path.join(workdir, f"matryoshka_rates_{budget:g}.json" if several else "matryoshka_rates.json")


def _budgets(budgets) -> tuple:
    """--budget as a tuple of floats; a value that is not a number is a one-line error."""
    values = (budgets,) if isinstance(budgets, (int, float)) else tuple(budgets)
    try:
        return tuple(float(b) for b in values)
    except ValueError:
        raise InputError(f"--budget={','.join(map(str, values))!r} must be numbers in (0, 1], comma-separated") \
            from None


def run(config, workdir: str, model, params, budgets, step: int, num_tokens: int, mesh=None, rules=(),
        units_per_round: int = 1) -> dict:
    """Searches `model` with `params` (bases included) on config.data's train split and writes the file(s)."""
    budgets = _budgets(budgets)
    step = step or max(1, model.config.head_dim // 8)
    for budget in budgets:  # before any text is read
        matryoshka_rates.check_budget_and_step(budget, step, model.config.head_dim)
    checks.integer("--calibration_tokens", num_tokens, minimum=1)
    batches = list(pca_tool.calibration_batches(config, workdir, num_tokens, what="the MatryoshkaKV rate search"))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(), nn.logical_axis_rules(rules):
        results = matryoshka_rates.search_path(model, params, batches, budgets, step, units_per_round)
    paths = []
    for budget, result in zip(budgets, results):
        paths.append(output_path(workdir, budget, len(budgets) > 1))
        matryoshka_rates.save(paths[-1], result)
        print(f"wrote {paths[-1]}: average rank / head_dim {result.average:.4f} (budget {budget}, step {step}), "
              f"last hidden state mean squared error {result.error:.3g} after {len(result.rounds)} lowerings")
        print(" ".join(f"--config.model.{key}='{value}'" for key, value in result.model_fields().items()))
    return {"path": paths[0], "paths": paths, "result": results[0], "results": results}


def build(config, workdir: str, budgets, step: int, num_tokens: int, units_per_round: int = 1) -> dict:
    """The workdir's latest checkpoint (or config.init_from), searched into WORKDIR/matryoshka_rates*.json."""
    config, _ = init_from.resolve(config)
    head_dim = config.model.head_dim
    for budget in _budgets(budgets):
        matryoshka_rates.check_budget_and_step(budget, step or max(1, head_dim // 8), head_dim)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.update(kv_rank=head_dim, kv_key_ranks=(), kv_value_ranks=())
    model = registry.build(config.model)
    mesh = mesh_lib.make_mesh_for_present_devices(config.mesh)
    rules = mesh_lib.axis_rules(config)
    abstract_params, param_shardings = mesh_lib.sharded_abstract_params(model, mesh, rules)
    params, _, _ = restore.params(config, workdir, abstract_params, param_shardings)
    return run(config, workdir, model, params, budgets, step, num_tokens, mesh, rules, units_per_round)


if __name__ == "__main__":
    cli.main(lambda: build(cli.CONFIG.value, cli.WORKDIR.value, BUDGETS.value, STEP.value, NUM_TOKENS.value,
                           UNITS_PER_ROUND.value))
