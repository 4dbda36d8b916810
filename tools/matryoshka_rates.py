"""MatryoshkaKV's per-head rate search (models/matryoshka_rates.py) on calibration text from config.data's train
split, into WORKDIR/matryoshka_rates.json.

  python tools/matryoshka_pca.py --config=configs/lm.py:tiny --workdir=workdirs/tiny        # the bases first
  python tools/matryoshka_rates.py --config=configs/lm.py:tiny --workdir=workdirs/tiny \\
      --config.model.kv_bases=workdirs/tiny/matryoshka_kv.npz --budget=0.5 [--rank_step=4] [--calibration_tokens=4096]

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
from errors import checks
from models import matryoshka_rates, registry
from parallel import mesh as mesh_lib
from tools import matryoshka_pca as pca_tool

BUDGET = flags.DEFINE_float("budget", 0.5, "Target average rank / head_dim, in (0, 1].")
STEP = flags.DEFINE_integer("rank_step", 0, "Rank decrement per round, dividing head_dim; 0 = head_dim / 8.")
NUM_TOKENS = flags.DEFINE_integer("calibration_tokens", 4096,
                                  "Calibration tokens the hidden-state error is measured on.")


def run(config, workdir: str, model, params, budget: float, step: int, num_tokens: int, mesh=None,
        rules=()) -> dict:
    """Searches `model` with `params` (bases included) on config.data's train split and writes the file."""
    step = step or max(1, model.config.head_dim // 8)
    matryoshka_rates.check_budget_and_step(budget, step, model.config.head_dim)  # before any text is read
    checks.integer("--calibration_tokens", num_tokens, minimum=1)
    batches = list(pca_tool.calibration_batches(config, workdir, num_tokens, what="the MatryoshkaKV rate search"))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(), nn.logical_axis_rules(rules):
        result = matryoshka_rates.search(model, params, batches, budget, step)
    path = os.path.join(workdir, "matryoshka_rates.json")
    matryoshka_rates.save(path, result)
    print(f"wrote {path}: average rank / head_dim {result.average:.4f} (budget {budget}, step {step}), last "
          f"hidden state mean squared error {result.error:.3g} after {len(result.rounds)} rounds")
    print(" ".join(f"--config.model.{key}='{value}'" for key, value in result.model_fields().items()))
    return {"path": path, "result": result}


def build(config, workdir: str, budget: float, step: int, num_tokens: int) -> dict:
    """The workdir's latest checkpoint (or config.init_from), searched into WORKDIR/matryoshka_rates.json."""
    config, _ = init_from.resolve(config)
    head_dim = config.model.head_dim
    matryoshka_rates.check_budget_and_step(budget, step or max(1, head_dim // 8), head_dim)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.update(kv_rank=head_dim, kv_key_ranks=(), kv_value_ranks=())
    model = registry.build(config.model)
    mesh = mesh_lib.make_mesh_for_present_devices(config.mesh)
    rules = mesh_lib.axis_rules(config)
    abstract_params, param_shardings = mesh_lib.sharded_abstract_params(model, mesh, rules)
    params, _, _ = restore.params(config, workdir, abstract_params, param_shardings)
    return run(config, workdir, model, params, budget, step, num_tokens, mesh, rules)


if __name__ == "__main__":
    cli.main(lambda: build(cli.CONFIG.value, cli.WORKDIR.value, BUDGET.value, STEP.value, NUM_TOKENS.value))
