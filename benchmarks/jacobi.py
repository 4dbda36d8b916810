"""Jacobi decoding against greedy decoding, side by side in one process: forwards per token, CLLM's counts, wall time.

  python benchmarks/jacobi.py --workdir workdirs/tiny --out workdirs/bench_jacobi
  GGUF=$(python -c "from configs import smollm2; print(smollm2.gguf_path())")   # the reference model, SmolLM2
  python benchmarks/jacobi.py --init-from=gguf:$GGUF --windows 16 --new-tokens 32 --batch 1

The model is the latest checkpoint of --workdir (configs/lm.py:tiny), else the checkpoint --init-from names (hf:DIR
or gguf:FILE), else configs/lm.py:tiny random-init (benchmarks/superposed.py's load_model). Prompts are the first
--batch next-line prompts of the validation split (held-out standard-library files, the rule of evaluate.py's
Superposed evaluator: metrics/drafts.py), --prompt-tokens long, in the model's tokenizer; or --batch random token
sequences with --prompts=random (a random-init model has no tokenizer). For each window in --windows, Jacobi
decoding (samplers/jacobi.py) and greedy decoding (the engine's PlainSampling) make --new-tokens tokens of the same
prompts with no stop tokens, so both make exactly that many; reported:
  tokens_equal_greedy    whether Jacobi's tokens are greedy's (they must be)
  tokens_per_iteration   tokens a Jacobi step commits, on average (1 for greedy decoding)
  forwards_per_token     forwards of the target per generated token, the prefill included (1 for greedy)
  fast_forwarded, stationary (per iteration)   CLLM's counts (samplers/jacobi.py says how they are counted)
  commits_histogram      steps that committed c tokens, c = 0..window + 1
  jacobi_s, greedy_s     median wall time of end-to-end generate_tokens over --repeats, taken round-robin after a
                         warm-up compile (benchmarks/superposed.py's median_seconds), and speedup = greedy / Jacobi
With --base (the model before consistency training: workdir:DIR, hf:DIR, gguf:FILE, or init-from for the --init-from
checkpoint when --workdir holds the trained one) the base model's counts come alongside (base_results, dashed in the
plot) and greedy_agreement_with_base: the fraction of prompts whose greedy tokens equal the base model's
(exact_match) and the mean fraction of tokens before the first difference.
Before consistency training CLLM expects about 1.0-1.1 tokens per iteration (its Jacobi baseline: 1.05x). A Jacobi
step runs window + 1 positions instead of one, so on a CPU, where a forward's time grows with its positions, it is
slower than a greedy step unless several tokens commit. Writes jacobi.json and jacobi.png to --out.
"""

import argparse
import functools
import json
import os
import pathlib

import jax
import numpy as np

from benchmarks.superposed import add_model_and_prompt_arguments, benchmark_prompts, load_model, median_seconds
from samplers.engine import Sampler, SamplerConfig
from samplers.jacobi import Jacobi, JacobiConfig


def measure(model, params, prompts, windows, new_tokens: int, repeats: int) -> tuple[list[dict], list]:
    """A row per window (Jacobi's counts and its wall time against greedy's), and greedy's tokens."""
    engine_config = SamplerConfig(max_new_tokens=new_tokens)
    greedy = Sampler(model, params, None, engine_config)
    greedy_tokens = greedy.generate_tokens(prompts).tokens
    results = []
    for window in windows:
        jacobi = Sampler(model, params, None, engine_config, Jacobi(JacobiConfig(window=window)))
        state = jacobi.decode(jacobi.prefill(prompts))
        row = {"window": window, "tokens_equal_greedy": jacobi.output(state, len(prompts)).tokens == greedy_tokens,
               **jacobi.strategy.summary(jacobi, state, len(prompts))}
        if repeats:
            row.update(median_seconds({"jacobi_s": functools.partial(jacobi.generate_tokens, prompts),
                                       "greedy_s": functools.partial(greedy.generate_tokens, prompts)}, repeats))
            row["speedup"] = row["greedy_s"] / row["jacobi_s"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return results, greedy_tokens


def agreement(tokens, base_tokens) -> dict:
    """How far the greedy outputs follow the base model's: whole outputs equal, and the mean fraction of tokens
    before the first difference."""
    prefixes = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                for x, y in zip(tokens, base_tokens)]
    return {"exact_match": float(np.mean([x == y for x, y in zip(tokens, base_tokens)])),
            "common_prefix_fraction": float(np.mean([p / max(len(y), 1) for p, y in zip(prefixes, base_tokens)]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", default="4,16", help="comma-separated Jacobi windows n")
    add_model_and_prompt_arguments(parser, prompt_tokens=64, new_tokens=32, repeats=5, prompts="held-out")
    parser.add_argument("--workdir", default="", help="a tiny-config workdir: its checkpoint and tokenizer")
    parser.add_argument("--base", default="", help="the model before consistency training, measured alongside: "
                        "workdir:DIR, or hf:DIR / gguf:FILE ('init-from': the --init-from checkpoint itself)")
    parser.add_argument("--out", default="workdirs/bench_jacobi")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config, model, params, tokenizer = load_model(args.init_from, args.workdir)
    prompts = benchmark_prompts(parser, args, config, tokenizer, model.config.vocab_size)
    windows = [int(w) for w in args.windows.split(",")]
    results, greedy_tokens = measure(model, params, prompts, windows, args.new_tokens, args.repeats)
    report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "model": args.init_from or "tiny", "workdir": args.workdir, "prompts": args.prompts,
              "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "results": results}
    if args.base:
        kind, _, path = args.base.partition(":")
        base = load_model(args.init_from, path) if kind == "workdir" else load_model(
            args.init_from if args.base == "init-from" else args.base, "")
        print(f"base model {args.base}:", flush=True)
        report["base"] = args.base
        report["base_results"], base_tokens = measure(*base[1:3], prompts, windows, args.new_tokens, 0)
        report["greedy_agreement_with_base"] = agreement(greedy_tokens, base_tokens)
        print(json.dumps(report["greedy_agreement_with_base"]), flush=True)
    (out / "jacobi.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "jacobi.png")
    print(f"wrote {out / 'jacobi.json'} and {out / 'jacobi.png'}")


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, (counts, times) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, style, rows in (("", "-", results), ("base, ", "--", report.get("base_results", []))):
        for result in rows:
            histogram = np.asarray(result["commits_histogram"], float)
            counts.plot(np.arange(len(histogram)), histogram / histogram.sum(), style, marker="o",
                        label=f"{name}window {result['window']}: {result['tokens_per_iteration']:.2f} tokens/iteration")
    counts.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    counts.set_xlabel("tokens committed by a Jacobi step")
    counts.set_ylabel("fraction of steps")
    counts.set_title("greedy decoding commits 1 per step", fontsize=9)
    counts.legend(fontsize=8)
    windows = [str(r["window"]) for r in results]
    x = np.arange(len(results))
    times.bar(x - 0.2, [r["jacobi_s"] * 1e3 for r in results], 0.4, label="Jacobi")
    times.bar(x + 0.2, [r["greedy_s"] * 1e3 for r in results], 0.4, label="greedy")
    for xi, r in zip(x, results):
        times.annotate(f"{r['speedup']:.2f}x", (xi - 0.2, r["jacobi_s"] * 1e3), ha="center", va="bottom",
                       fontsize=8)
    times.set_xticks(x, windows)
    times.set_xlabel("window")
    times.set_ylabel("wall time per call (ms)")
    times.legend(fontsize=8)
    fig.suptitle(f"{report['new_tokens']} new tokens, batch {report['batch']}, {report['prompts']} prompts, "
                 f"{os.path.basename(report['model'])}, {report['backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
