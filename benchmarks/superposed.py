"""Wall time to produce k drafts: Superposed Decoding against nucleus sampling and greedy, side by side in one process.

  python benchmarks/superposed.py --ks 2,3,5,10 --out workdirs/bench_superposed [--workdir workdirs/tiny]
  GGUF=$(python -c "from configs import smollm2; print(smollm2.gguf_path())")   # the reference model, SmolLM2
  python benchmarks/superposed.py --init-from=gguf:$GGUF --workdir=workdirs/smollm2 --prompts=held-out

For each k, after a warm-up compile, the median over --repeats (taken round-robin across the contenders) of end to
end `generate_tokens` (prefill, decode loop, host output) for the same prompts and new-token count, with no stop
tokens so every run makes exactly that many:
  superposed           k drafts, one cache row per prompt, n-gram lookups on device inside the loop (included)
  superposed_no_ngram  the same with alpha = 0 (no lookups), to show what the lookups cost
  nucleus_sequential   k nucleus runs (temperature 0.6, top-p 0.9) one after another, batch = the prompts
  nucleus_batched      one nucleus run over the prompts repeated k times (the engine pads the batch to a power of 2)
  greedy               one greedy run, batch = the prompts
The model is the latest checkpoint of --workdir (configs/lm.py:tiny), else the checkpoint --init-from names (hf:DIR
or gguf:FILE, as config.init_from), else configs/lm.py:tiny random-init. Prompts are --batch random token sequences,
or with --prompts=held-out the first --batch next-line prompts of the validation split that evaluate.py's
Superposed evaluator uses (metrics/drafts.py, BOS first where the tokenizer adds one), in the workdir's tokenizer
(WORKDIR/tokenizer.json, which tools/build_ngrams.py writes beside the store, else the --init-from checkpoint's).
The n-gram store is WORKDIR/ngrams.npz, or else one built here from a synthetic corpus (a random sparse Markov chain
over the vocabulary) whose build time and size are reported. Also reported: the cost of one jitted n-gram lookup of
(batch, k, m) candidates. Writes superposed.json and superposed.png (time against k) to --out. The targets from the
issue, checked at k = 3: superposed at least 2.44x faster than nucleus_sequential and at most 1.2x greedy.
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import init_from as init_from_lib, restore
from configs import lm
from data import corpus, tokenizer as tokenizer_lib
from evaluators.superposed import NUCLEUS
from metrics import drafts
from models import registry
from parallel import mesh as mesh_lib
from samplers import ngram_store
from samplers.engine import Sampler, SamplerConfig
from samplers.plain import PlainSampling
from samplers.superposed import Superposed, SuperposedConfig

SPEEDUP_TARGET = 2.44  # the paper: at least 2.44x faster than nucleus sampling for k >= 3
GREEDY_TARGET = 1.2  # the issue: no more than 1.2x one greedy run


def load_model(init_from: str, workdir: str, model_fields: dict | None = None):
    """(config, model, params, tokenizer) of configs/lm.py:tiny with init_from resolved: the latest checkpoint of
    workdir, else the init_from checkpoint, else a random initialisation; the tokenizer is the workdir's
    (WORKDIR/tokenizer.json, else the init_from checkpoint's), None without either. model_fields set config.model
    fields after that (e.g. kv_rank and kv_bases: MatryoshkaKV bases the checkpoint lacks come from the file,
    checkpoints/restore.py)."""
    config = lm.get_config("tiny")
    config.init_from = init_from
    config, _ = init_from_lib.resolve(config)
    config.model.update(model_fields or {})
    model = registry.build(config.model)

    def initialise():
        return mesh_lib.strip_logical_names(model.init(jax.random.key(0), *model.example_inputs())["params"])

    params, _, _ = restore.params(config, workdir, jax.eval_shape(initialise), initialise=initialise)
    tokenizer = tokenizer_lib.existing_tokenizer(config.data, workdir, config.model.vocab_size)
    return config, model, params, tokenizer


def add_model_and_prompt_arguments(parser, *, prompt_tokens: int, new_tokens: int, repeats: int, prompts: str):
    """The flags this benchmark shares with benchmarks/jacobi.py: the model, its prompts, the timing repeats."""
    parser.add_argument("--batch", type=int, default=1, help="prompts per run")
    parser.add_argument("--prompt-tokens", type=int, default=prompt_tokens)
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--init-from", default="", help="hf:DIR or gguf:FILE, as config.init_from")
    parser.add_argument("--prompts", choices=("random", "held-out"), default=prompts)


def benchmark_prompts(parser, args, config, tokenizer, vocab_size: int) -> list[list[int]]:
    """--batch prompts of --prompt-tokens tokens: held-out next-line prompts, or random tokens."""
    if args.prompts == "held-out":
        if tokenizer is None:
            parser.error("--prompts=held-out needs a tokenizer: a --workdir with tokenizer.json, or --init-from")
        return held_out_prompts(config, tokenizer, args.prompt_tokens, args.new_tokens, args.batch)
    return np.random.default_rng(0).integers(0, vocab_size, (args.batch, args.prompt_tokens)).tolist()


def held_out_prompts(config, tokenizer, prompt_tokens: int, new_tokens: int, batch: int) -> list[list[int]]:
    """The first `batch` prompts of the Superposed evaluator's rule on the validation split."""
    validation = corpus.load_corpus(config.data)["validation"]
    texts = (corpus.record_text(validation[i], config.data) for i in range(len(validation)))
    prompts = drafts.next_line_prompts(tokenizer, texts, prompt_tokens, new_tokens, batch, config.seed)
    if len(prompts) < batch:
        raise SystemExit(f"the validation split has only {len(prompts)} next-line prompts; lower --batch")
    return [p["prompt_tokens"] for p in prompts]


def synthetic_store(vocab_size: int, num_tokens: int, path: str) -> dict:
    """Builds and saves a store from a random Markov chain (16 successors per token, 1000-token documents)."""
    rng = np.random.default_rng(0)
    successors_VS = rng.integers(0, vocab_size, (vocab_size, 16))
    tokens = np.empty(num_tokens, np.int64)
    tokens[0] = 0
    choices = rng.integers(0, 16, num_tokens)
    for i in range(1, num_tokens):
        tokens[i] = successors_VS[tokens[i - 1], choices[i]]
    return ngram_store.build_and_save(np.array_split(tokens, max(1, num_tokens // 1000)), path,
                                      vocab_size=vocab_size)


def median_seconds(contenders: dict, repeats: int, compiled: bool = False) -> dict:
    """{name: median seconds of calling it}; each is called once to compile (unless `compiled`: the caller has run
    them), then the repeats go round-robin, so the drift of a shared machine hits every contender alike."""
    for fn in () if compiled else contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def sequential_runs(sampler, prompts, k: int):
    return [sampler.generate_tokens(prompts, seed=i) for i in range(k)]


def lookup_cost(store, batch: int, k: int, m: int, repeats: int) -> dict:
    """Median seconds of one jitted ngram_log_probs over (batch, k, m) candidates with 32-token histories."""
    rng = np.random.default_rng(1)
    device_store = jax.device_put(store)
    history_BDT = jnp.asarray(rng.integers(0, store.vocab_size, (batch, k, 32)), jnp.int32)
    history_len_BD = jnp.full((batch, k), 32, jnp.int32)
    candidates_BDM = jnp.asarray(rng.integers(0, store.vocab_size, (batch, k, m)), jnp.int32)
    lookup = jax.jit(ngram_store.ngram_log_probs)
    seconds = median_seconds({"lookup": lambda: jax.block_until_ready(
        lookup(device_store, history_BDT, history_len_BD, candidates_BDM))}, repeats)["lookup"]
    queries = batch * k * m * len(store.orders)
    return {"batch": batch, "k": k, "m": m, "seconds": seconds, "queries": queries,
            "microseconds_per_query": seconds / queries * 1e6}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="2,3,5,10")
    add_model_and_prompt_arguments(parser, prompt_tokens=15, new_tokens=10, repeats=21, prompts="random")
    parser.add_argument("--workdir", default="", help="a tiny-config workdir: its checkpoint, tokenizer and ngrams.npz")
    parser.add_argument("--synthetic-tokens", type=int, default=800_000,
                        help="corpus size for the synthetic n-gram store (without a workdir store)")
    parser.add_argument("--out", default="workdirs/bench_superposed")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config, model, params, tokenizer = load_model(args.init_from, args.workdir)
    vocab_size = model.config.vocab_size
    store_path = os.path.join(args.workdir, "ngrams.npz") if args.workdir else ""
    if store_path and os.path.exists(store_path):
        store_info = {"path": store_path, "file_bytes": os.path.getsize(store_path), "source": "workdir"}
    else:
        store_path = str(out / "synthetic_ngrams.npz")
        store_info = synthetic_store(vocab_size, args.synthetic_tokens, store_path) | {"source": "synthetic"}
    load_start = time.perf_counter()
    store = ngram_store.load_ngram_store(store_path)
    store_info.update(load_seconds=time.perf_counter() - load_start, rows=int(store.key_R3.shape[0]),
                      orders=list(store.orders))
    print(f"n-gram store: {json.dumps(store_info)}", flush=True)

    N = args.new_tokens
    prompts = benchmark_prompts(parser, args, config, tokenizer, vocab_size)
    engine_config = SamplerConfig(max_new_tokens=N)
    greedy = Sampler(model, params, None, engine_config)
    nucleus = Sampler(model, params, None, engine_config, PlainSampling(NUCLEUS))
    results = []
    for k in (int(k) for k in args.ks.split(",")):
        method = SuperposedConfig(num_drafts=k).resolved()
        spd = Sampler(model, params, None, engine_config, Superposed(method, store))
        spd_no_ngram = Sampler(model, params, None, engine_config,
                               Superposed(dataclasses.replace(method, alpha=0.0)))
        contenders = {
            "superposed_s": functools.partial(spd.generate_tokens, prompts),
            "superposed_no_ngram_s": functools.partial(spd_no_ngram.generate_tokens, prompts),
            "nucleus_sequential_s": functools.partial(sequential_runs, nucleus, prompts, k),
            "nucleus_batched_s": functools.partial(nucleus.generate_tokens, prompts * k),
            "greedy_s": functools.partial(greedy.generate_tokens, prompts),
        }
        row = {"k": k, "m": method.num_candidates, "alpha": method.alpha, "temperature": method.temperature,
               **median_seconds(contenders, args.repeats),
               "lookup": lookup_cost(store, args.batch, k, method.num_candidates, args.repeats)}
        row["speedup_vs_nucleus_sequential"] = row["nucleus_sequential_s"] / row["superposed_s"]
        row["speedup_vs_nucleus_batched"] = row["nucleus_batched_s"] / row["superposed_s"]
        row["ratio_to_greedy"] = row["superposed_s"] / row["greedy_s"]
        row["ngram_share"] = 1 - row["superposed_no_ngram_s"] / row["superposed_s"]
        results.append(row)
        print(json.dumps(row), flush=True)

    at3 = next((r for r in results if r["k"] == 3), None)
    targets = None if at3 is None else {
        f"speedup_vs_nucleus_sequential >= {SPEEDUP_TARGET}": at3["speedup_vs_nucleus_sequential"] >= SPEEDUP_TARGET,
        f"ratio_to_greedy <= {GREEDY_TARGET}": at3["ratio_to_greedy"] <= GREEDY_TARGET}
    report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "model": args.init_from or "tiny", "workdir": args.workdir, "prompts": args.prompts,
              "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": N, "repeats": args.repeats,
              "ngram_store": store_info, "results": results, "targets_at_k3": targets}
    (out / "superposed.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "superposed.png", report)
    print(f"targets at k=3: {targets}\nwrote {out / 'superposed.json'} and {out / 'superposed.png'}")


def plot(results, path, report):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in results]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, label in (("superposed_s", "Superposed Decoding"), ("superposed_no_ngram_s", "Superposed, no n-grams"),
                       ("nucleus_sequential_s", "nucleus, k sequential runs"),
                       ("nucleus_batched_s", "nucleus, one batch of k"), ("greedy_s", "greedy, one run")):
        ax.plot(ks, [r[key] * 1e3 for r in results], marker="o", label=label)
    ax.set_xlabel("drafts k")
    ax.set_ylabel("wall time per call (ms)")
    ax.set_xticks(ks)
    ax.set_title(f"k drafts of {report['new_tokens']} tokens, batch {report['batch']}, "
                 f"{os.path.basename(report['model'])}, {report['backend']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
