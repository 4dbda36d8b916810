"""MatryoshkaKV's heterogeneous per-head ranks (the paper's greedy rate search, cal_adaptive_rate.py): which KV
heads may keep fewer columns of their key or value basis for the least damage to the model.

Units are the (softmax layer, KV head, key or value) triples, numbered layer-major, then head, key before value.
Every unit starts at head_dim. Each round lowers by `step` the rank of the one unit whose reduction leaves the
model's last hidden state (the final norm's output) nearest the uncompressed model's, in mean squared difference
over the calibration tokens; ties go to the lowest unit number, and no unit goes below `step`. The rounds stop at
the first configuration whose average rank / head_dim is at most the budget, so the average is within
step / (units * head_dim) under it, and equal to it when budget * units * head_dim is a multiple of step. (The
reference lowers many units per round, each measured against the current configuration; lowering one per round
is the finer-grained form of the same greedy.)

A round scores every unit in one jitted call: the ranks are traced arrays in MatryoshkaKV's RANKS collection, so
the search compiles once whatever the ranks. The bases are the parameters' (PCA: models/matryoshka_pca.py).

  result = matryoshka_rates.search(model, params, batches, budget=0.5, step=head_dim // 8)
  config.model.update(result.model_fields())   # kv_rank, kv_key_ranks, kv_value_ranks (layer-major)
  matryoshka_rates.save(path, result); fields = matryoshka_rates.load(path)

`batches` are (tokens [B, T] int32, lengths [B]) pairs, row b's first lengths[b] tokens counting.
"""

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from errors import InputError, checks
from models import matryoshka_kv, matryoshka_pca
from models.matryoshka_kv import RANKS

SUBTREE = matryoshka_pca.SUBTREE
_CANDIDATES_AT_ONCE = 8  # candidate configurations per vmapped forward (lax.map batches them)


@dataclasses.dataclass(frozen=True)
class Result:
    key_ranks: tuple  # layer-major, num_layers * num_kv_heads (non-softmax layers' entries: kv_rank, unused)
    value_ranks: tuple
    kv_rank: int  # the padded width: the largest rank
    head_dim: int
    budget: float
    step: int
    average: float  # mean rank / head_dim over the searched units
    error: float  # mean squared last-hidden-state difference at these ranks
    rounds: tuple  # per lowering (unit, layer, head, "key" or "value", its error scored alone), in order

    def model_fields(self) -> dict:
        return {"kv_rank": self.kv_rank, "kv_key_ranks": self.key_ranks, "kv_value_ranks": self.value_ranks}


def check_budget_and_step(budget, step, head_dim: int) -> None:
    """One-line InputErrors for a budget outside (0, 1], a step not dividing head_dim, or a budget below
    step / head_dim (every unit keeps at least one step)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0 < budget <= 1:
        raise InputError(f"--budget={budget!r} must be a number in (0, 1]: the average rank / head_dim to reach")
    if not checks.is_int(step) or step < 1 or head_dim % step:
        raise InputError(f"--rank_step={step!r} must be a positive integer dividing config.model.head_dim={head_dim} "
                         "(the ranks move in multiples of it)")
    if budget < step / head_dim:
        raise InputError(f"--budget={budget!r} is below --rank_step / config.model.head_dim = {step}/{head_dim}: every "
                         "unit keeps at least one step of rank")


def search_model(model):
    """`model` at kv_rank = head_dim with no static per-head ranks: the searched ranks come traced."""
    config = dataclasses.replace(model.config, kv_rank=model.config.head_dim, kv_key_ranks=(), kv_value_ranks=(),
                                 kv_bases="")
    return type(model)(config)


def _softmax_layers(config) -> tuple:
    layers = tuple(i for i in range(config.num_layers) if config.mixer(i) == "softmax")
    if not layers:
        raise InputError(f"config.model.mixer_pattern={config.mixer_pattern!r} has no softmax layer: no keys and "
                         "values for MatryoshkaKV to compress")
    return layers


def _final_hidden(model, variables, tokens_BT):
    _, state = model.apply(variables, tokens_BT,
                           capture_intermediates=lambda module, method: module.name == "final_norm")
    return state["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _reference(base, params, tokens_BT):
    return _final_hidden(base, {"params": params}, tokens_BT)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _squared_errors(model, layers, params, tokens_BT, valid_BT, reference_BTD, key_CLK, value_CLK):
    """Per candidate c, the sum over valid tokens of |h - h_ref|^2 with key_CLK[c], value_CLK[c] as ranks."""

    def one(ranks):
        h_BTD = _final_hidden(model, {"params": params, RANKS: matryoshka_kv.ranks_collection(layers, *ranks)},
                              tokens_BT)
        return jnp.sum(jnp.square(h_BTD - reference_BTD) * valid_BT[..., None])

    return jax.lax.map(one, (key_CLK, value_CLK), batch_size=min(_CANDIDATES_AT_ONCE, key_CLK.shape[0]))


class _Calibration:
    """The calibration batches with the uncompressed model's last hidden states, and the error of rank sets."""

    def __init__(self, model, params, batches):
        config = model.config
        self.layers = _softmax_layers(config)
        if any(SUBTREE not in params[f"layer_{i}"]["attention"] for i in self.layers):
            raise InputError("the parameters have no MatryoshkaKV bases to search ranks in; give them with "
                             "config.model.kv_bases (tools/matryoshka_pca.py's matryoshka_kv.npz)")
        self.model, self.params = search_model(model), params
        base = matryoshka_pca.base_model(model)
        base_params = matryoshka_pca.base_params(params)
        self.batches, tokens = [], 0
        for tokens_BT, lengths_B in batches:
            tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
            lengths_B = np.asarray(lengths_B)
            valid_BT = jnp.asarray(np.arange(tokens_BT.shape[1])[None, :] < lengths_B[:, None], jnp.float32)
            self.batches.append((tokens_BT, valid_BT, _reference(base, base_params, tokens_BT)))
            tokens += int(lengths_B.sum())
        if tokens == 0:
            raise InputError("the rate search's calibration batches held 0 tokens; it needs calibration text (a "
                             "corpus with non-empty documents)")
        self.norm = tokens * config.embed_dim

    def errors(self, key_CLK, value_CLK) -> np.ndarray:
        """Mean squared last-hidden-state difference per candidate ([C, softmax layers, K] rank arrays)."""
        key_CLK, value_CLK = jnp.asarray(key_CLK, jnp.int32), jnp.asarray(value_CLK, jnp.int32)
        total = np.zeros(key_CLK.shape[0])
        for tokens_BT, valid_BT, reference_BTD in self.batches:
            total += np.asarray(jax.device_get(_squared_errors(self.model, self.layers, self.params, tokens_BT,
                                                               valid_BT, reference_BTD, key_CLK, value_CLK)),
                                np.float64)
        return total / self.norm


def _split(ranks_U, num_layers: int, K: int):
    """Unit-ordered ranks [U] (layer, head, key/value) -> key and value ranks [..., layers, K]."""
    ranks_LK2 = ranks_U.reshape(*ranks_U.shape[:-1], num_layers, K, 2)
    return ranks_LK2[..., 0], ranks_LK2[..., 1]


def _layer_major(ranks_LK, layers, num_layers: int, fill: int) -> tuple:
    full_LK = np.full((num_layers, ranks_LK.shape[1]), fill, np.int64)
    full_LK[list(layers)] = ranks_LK
    return tuple(int(r) for r in full_LK.reshape(-1))


def hidden_state_error(model, params, batches, key_ranks, value_ranks) -> float:
    """The mean squared difference of the last hidden state from the uncompressed model's at the given layer-major
    per-head ranks (num_layers * num_kv_heads each, as config.model.kv_key_ranks / kv_value_ranks)."""
    calibration = _Calibration(model, params, batches)
    K = model.config.num_kv_heads
    pick = lambda ranks: np.asarray(ranks).reshape(-1, K)[list(calibration.layers)][None]  # noqa: E731
    return float(calibration.errors(pick(key_ranks), pick(value_ranks))[0])


def search(model, params, batches, budget: float, step: int, units_per_round: int = 1) -> Result:
    """The greedy search (module docstring) on `model` (any kv_rank; its MatryoshkaKV bases in `params`)."""
    return search_path(model, params, batches, (budget,), step, units_per_round)[0]


def search_path(model, params, batches, budgets, step: int, units_per_round: int = 1) -> tuple[Result, ...]:
    """One greedy trajectory through several budgets: the Result at each (in the order given), as `search` would
    return it for that budget alone when units_per_round is 1. Each round lowers the units_per_round units of least
    error, each scored alone against the current ranks (the reference's many-units-per-round form), but never more
    than the next budget needs."""
    config = model.config
    H, K = config.head_dim, config.num_kv_heads
    for budget in budgets:
        check_budget_and_step(budget, step, H)
    checks.integer("units_per_round", units_per_round, minimum=1)
    calibration = _Calibration(model, params, batches)
    layers = calibration.layers
    U = len(layers) * K * 2
    ranks_U = np.full((U,), H, np.int64)
    lowered_UU = np.eye(U, dtype=np.int64) * step  # candidate c lowers unit c
    rounds, results = [], {}
    for budget in sorted(set(budgets), reverse=True):
        max_total = math.floor(budget * U * H + 1e-9)
        while ranks_U.sum() > max_total:
            candidates_CU = np.maximum(ranks_U[None, :] - lowered_UU, 0)
            errors_C = calibration.errors(*_split(candidates_CU, len(layers), K))
            errors_C[ranks_U <= step] = np.inf  # a unit keeps at least one step
            needed = -(-(ranks_U.sum() - max_total) // step)
            order = [u for u in np.argsort(errors_C, kind="stable") if np.isfinite(errors_C[u])]  # ties: lowest
            for unit in order[:min(units_per_round, needed)]:
                ranks_U[unit] -= step
                layer, rest = divmod(int(unit), 2 * K)
                rounds.append((int(unit), layers[layer], rest // 2, ("key", "value")[rest % 2], float(errors_C[unit])))
        key_LK, value_LK = _split(ranks_U, len(layers), K)
        kv_rank = int(ranks_U.max())
        results[budget] = Result(
            _layer_major(key_LK, layers, config.num_layers, kv_rank),
            _layer_major(value_LK, layers, config.num_layers, kv_rank), kv_rank, H, float(budget), int(step),
            float(ranks_U.sum() / (U * H)), float(calibration.errors(key_LK[None], value_LK[None])[0]),
            tuple(rounds))
    return tuple(results[budget] for budget in budgets)


def save(path: str, result: Result) -> None:
    """The result as JSON: kv_rank, kv_key_ranks, kv_value_ranks (what load returns) and the search's record."""
    record = dataclasses.asdict(result)
    record = {"kv_rank": record.pop("kv_rank"), "kv_key_ranks": list(record.pop("key_ranks")),
              "kv_value_ranks": list(record.pop("value_ranks")), **record,
              "rounds": [dict(zip(("unit", "layer", "head", "kind", "error"), r)) for r in result.rounds]}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def load(path: str, key: str = "--rates") -> dict:
    """{kv_rank, kv_key_ranks, kv_value_ranks} of a file `save` wrote: config.model fields (the model checks the
    counts and ranges when built). A missing or malformed file is a one-line InputError naming `key`."""
    what = "a rate-search result (tools/matryoshka_rates.py's matryoshka_rates.json)"
    if not os.path.isfile(path):
        raise InputError(f"{key}={path!r} is not a file; expected {what}")
    try:
        with open(path) as f:
            record = json.load(f)
        fields = {"kv_rank": record["kv_rank"], "kv_key_ranks": tuple(record["kv_key_ranks"]),
                  "kv_value_ranks": tuple(record["kv_value_ranks"])}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{key}={path!r} is not {what}: {type(error).__name__} {error}".splitlines()[0]) from None
    return fields
