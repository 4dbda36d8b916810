"""MatryoshkaKV on a real model, side by side in one process: quality against the cache budget for each set of bases
(PCA, trained at one fixed rank, Matryoshka-trained) at uniform and searched per-head ranks, and the time of a decode
step over a 4k-token cache at each budget against the uncompressed cache.

  GGUF=$(python -c "from configs import smollm2; print(smollm2.gguf_path())")
  python benchmarks/matryoshka_kv.py --init-from=gguf:$GGUF --out workdirs/bench_matryoshka_kv \
      --bases pca=workdirs/smollm2/matryoshka_kv.npz fixed=workdirs/matryoshka_fixed_smollm2 \
              matryoshka=workdirs/matryoshka_smollm2

--bases NAME=PATH: a MatryoshkaKV file (tools/matryoshka_pca.py's matryoshka_kv.npz) or a workdir whose latest
checkpoint holds trained bases (configs/matryoshka_kv.py). Searched ranks are read from the rate files beside it
(tools/matryoshka_rates.py --budget=0.75,0.5,0.4,0.25: DIR/matryoshka_rates_<budget>.json, DIR the workdir or the
file's directory); a budget without its file is measured at uniform ranks only. Uniform ranks at budget b are
round(b * head_dim) for every head, so the achieved budget (reported) can differ from b by under 1 / head_dim.

Quality, on the first --num-batches validation batches of configs/lm.py:tiny's data (standard-library source,
seq_len 128, 16 rows), against the uncompressed model on the same tokens:
  perplexity          exp of the mean next-token loss
  accuracy            next-token top-1 accuracy (argmax = the data's next token); accuracy_retained = accuracy /
                      the uncompressed model's (the issue's "top-1 agreement with the data")
  agreement           the fraction of positions whose argmax equals the uncompressed model's
Every configuration runs one compiled forward: the ranks are traced (MatryoshkaKV's RANKS collection), which gives
the same logits as static ranks (tests/test_matryoshka_rates.py).

Decode time: one decode step (a token per row, the engine's forward over the cache, parameters in the decode form)
with --context cached positions, per --decode-batches, median of --repeats calls taken round-robin; uniform ranks
(the compressed cache is padded to one width, so per-head ranks cost their largest); the cache bytes are the
engine's (Sampler.cache_bytes). Writes matryoshka_kv.json and matryoshka_kv.png to --out.
"""

import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.superposed import load_model
from data import corpus, pipeline
from errors import InputError
from models import matryoshka_kv, matryoshka_rates
from samplers.engine import Sampler


def bases_sources(specs) -> dict:
    """{name: (kv_bases file or "", workdir or "", directory of its rate files)} from NAME=PATH arguments."""
    sources = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise InputError(f"--bases {spec!r} must be NAME=PATH (a matryoshka_kv.npz file or a trained workdir)")
        if os.path.isfile(path):
            sources[name] = (path, "", os.path.dirname(path))
        elif os.path.isdir(path):
            sources[name] = ("", path, path)
        else:
            raise InputError(f"--bases {spec!r}: {path!r} is neither a MatryoshkaKV file nor a workdir")
    return sources


def rank_configurations(head_dim: int, num_layers: int, num_kv_heads: int, budgets, rates_dir: str) -> list[dict]:
    """Per budget: uniform ranks, and the searched ones where the rate file exists (layer-major tuples)."""
    units = num_layers * num_kv_heads
    configurations = []
    for budget in budgets:
        rank = max(1, round(budget * head_dim))
        configurations.append({"rates": "uniform", "budget": budget, "key_ranks": (rank,) * units,
                               "value_ranks": (rank,) * units})
        path = os.path.join(rates_dir, f"matryoshka_rates_{budget:g}.json")
        if os.path.isfile(path):
            fields = matryoshka_rates.load(path, key="--bases rate file")
            configurations.append({"rates": "searched", "budget": budget, "key_ranks": fields["kv_key_ranks"],
                                   "value_ranks": fields["kv_value_ranks"]})
    for configuration in configurations:
        total = sum(configuration["key_ranks"]) + sum(configuration["value_ranks"])
        configuration["achieved_budget"] = total / (2 * units * head_dim)
    return configurations


def next_token_nll_and_top(logits_BTV, targets_BT):
    """(summed next-token negative log-likelihood, argmax per position) of logits against their targets."""
    log_p_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nll = -jnp.sum(jnp.take_along_axis(log_p_BTV, targets_BT[..., None], axis=-1))
    return nll, jnp.argmax(logits_BTV, axis=-1)


def quality(model, params, batches, reference, configurations) -> list[dict]:
    """Perplexity, accuracy and agreement of `model` (kv_rank = head_dim) with `params` at each configuration."""
    config = model.config
    layers = [i for i in range(config.num_layers) if config.mixer(i) == "softmax"]
    K = config.num_kv_heads

    @jax.jit
    def sums(params, key_LK, value_LK, tokens_BT1, reference_top_BT):
        variables = {"params": params, matryoshka_kv.RANKS: matryoshka_kv.ranks_collection(layers, key_LK, value_LK)}
        logits_BTV, _ = model.apply(variables, tokens_BT1[:, :-1])
        nll, top_BT = next_token_nll_and_top(logits_BTV, tokens_BT1[:, 1:])
        return nll, jnp.sum(top_BT == tokens_BT1[:, 1:]), jnp.sum(top_BT == reference_top_BT)

    rows = []
    for configuration in configurations:
        pick = lambda ranks: jnp.asarray(np.asarray(ranks).reshape(-1, K)[layers], jnp.int32)  # noqa: E731
        totals = np.zeros(3)
        for batch, reference_top_BT in zip(batches, reference["top"]):
            totals += np.asarray(jax.device_get(sums(params, pick(configuration["key_ranks"]),
                                                     pick(configuration["value_ranks"]), batch["tokens"],
                                                     reference_top_BT)), np.float64)
        nll, correct, agree = totals / reference["positions"]
        row = {key: configuration[key] for key in ("rates", "budget", "achieved_budget")}
        row.update(perplexity=float(np.exp(nll)), accuracy=float(correct), agreement=float(agree),
                   accuracy_retained=float(correct / reference["accuracy"]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def uncompressed_reference(model, params, batches) -> dict:
    """The uncompressed model's argmax per position and its perplexity and accuracy on the batches."""
    forward = jax.jit(lambda p, tokens_BT1: next_token_nll_and_top(model.apply({"params": p}, tokens_BT1[:, :-1])[0],
                                                                    tokens_BT1[:, 1:]))
    tops, nll, correct, positions = [], 0.0, 0, 0
    for batch in batches:
        batch_nll, top_BT = forward(params, batch["tokens"])
        targets_BT = batch["tokens"][:, 1:]
        tops.append(top_BT)
        nll += float(batch_nll)
        correct += int(jnp.sum(top_BT == targets_BT))
        positions += targets_BT.size
    return {"top": tops, "positions": positions, "perplexity": float(np.exp(nll / positions)),
            "accuracy": correct / positions}


def decode_times(init_from: str, bases: str, workdir: str, ranks, context: int, batches, repeats: int) -> list[dict]:
    """Median seconds of one decode step over `context` cached positions, per rank (0: uncompressed) and batch."""
    steps = {}
    for rank in ranks:
        fields = {"kv_rank": rank, "kv_bases": bases} if rank else {}
        _, model, params, _ = load_model(init_from, workdir if rank else "", fields)
        params = jax.tree.map(jnp.asarray, model.decode_params(params))
        step = jax.jit(lambda p, t, c, model=model: model.apply({"params": p}, t, c), donate_argnums=2)
        for batch in batches:
            cache = model.init_cache(batch, context + 2 * repeats + 8)
            cache = cache.replace(lengths_B=jnp.full((batch,), context, jnp.int32))
            steps[rank, batch] = {"step": step, "params": params, "cache": cache, "bytes": Sampler.cache_bytes(
                cache), "times": []}
    tokens_B1 = {batch: jnp.zeros((batch, 1), jnp.int32) for batch in batches}
    for repeat in range(repeats + 1):  # the first round compiles
        for (rank, batch), entry in steps.items():
            start = time.perf_counter()
            logits_B1V, entry["cache"] = entry["step"](entry["params"], tokens_B1[batch], entry["cache"])
            logits_B1V.block_until_ready()
            if repeat:
                entry["times"].append(time.perf_counter() - start)
    rows = []
    for (rank, batch), entry in steps.items():
        rows.append({"kv_rank": rank, "batch": batch, "step_s": float(np.median(entry["times"])),
                     "cache_bytes": entry["bytes"]})
    for row in rows:
        base = next(r for r in rows if r["kv_rank"] == 0 and r["batch"] == row["batch"])
        row.update(time_ratio=row["step_s"] / base["step_s"], bytes_ratio=row["cache_bytes"] / base["cache_bytes"])
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", default="", help="the base model: hf:DIR or gguf:FILE, as config.init_from")
    parser.add_argument("--bases", nargs="+", required=True, help="NAME=PATH (matryoshka_kv.npz or a workdir)")
    parser.add_argument("--budgets", default="0.75,0.5,0.4,0.25")
    parser.add_argument("--num-batches", type=int, default=4, help="validation batches of 16 x 128 tokens")
    parser.add_argument("--context", type=int, default=4000, help="cached positions for the decode time")
    parser.add_argument("--decode-batches", default="1,8")
    parser.add_argument("--decode-bases", default="", help="the --bases NAME timed (default: the last)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="workdirs/bench_matryoshka_kv")
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    try:
        sources = bases_sources(args.bases)
    except InputError as error:
        parser.error(str(error))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config, base, base_params, tokenizer = load_model(args.init_from, "")
    batches = pipeline.eval_batches(config.data, tokenizer, corpus.load_corpus(config.data)["validation"],
                                    num_batches=args.num_batches, process_index=0, process_count=1)
    reference = uncompressed_reference(base, base_params, batches)
    head_dim = config.model.head_dim
    report = {"uncompressed": {key: reference[key] for key in ("perplexity", "accuracy", "positions")},
              "head_dim": head_dim, "quality": {}}
    print(json.dumps(report["uncompressed"]), flush=True)
    for name, (bases, workdir, rates_dir) in sources.items():
        _, model, params, _ = load_model(args.init_from, workdir, {"kv_rank": head_dim, "kv_bases": bases})
        configurations = rank_configurations(head_dim, config.model.num_layers, config.model.num_kv_heads, budgets,
                                             rates_dir)
        print(f"bases {name}", flush=True)
        report["quality"][name] = quality(model, params, batches, reference, configurations)

    timed = args.decode_bases or list(sources)[-1]
    bases, workdir, _ = sources[timed]
    ranks = [0] + sorted({max(1, round(b * head_dim)) for b in budgets}, reverse=True)
    report["decode"] = {"bases": timed, "context": args.context, "rows": decode_times(
        args.init_from, bases, workdir, ranks, args.context, [int(b) for b in args.decode_batches.split(",")],
        args.repeats)}
    (out / "matryoshka_kv.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "matryoshka_kv.png")
    print(f"wrote {out / 'matryoshka_kv.json'} and {out / 'matryoshka_kv.png'}")


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (quality_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for color, (name, rows) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], report["quality"].items()):
        for rates, style in (("uniform", "--"), ("searched", "-")):
            points = sorted((r["achieved_budget"], r["accuracy_retained"]) for r in rows if r["rates"] == rates)
            if points:
                quality_ax.plot(*zip(*points), style, color=color, marker="o", label=f"{name}, {rates}")
    quality_ax.axhline(0.9, color="gray", lw=0.8, ls=":")
    quality_ax.set(xlabel="average cache budget (rank / head_dim)", ylabel="top-1 accuracy / uncompressed",
                   title="Next-token accuracy retained")
    quality_ax.legend(fontsize=8)
    for batch in sorted({r["batch"] for r in report["decode"]["rows"]}):
        points = sorted((r["bytes_ratio"], r["time_ratio"]) for r in report["decode"]["rows"] if r["batch"] == batch)
        time_ax.plot(*zip(*points), marker="o", label=f"batch {batch}")
    time_ax.set(xlabel="cache bytes / uncompressed", ylabel="decode step time / uncompressed",
                title=f"Decode step over {report['decode']['context']} cached tokens")
    time_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
