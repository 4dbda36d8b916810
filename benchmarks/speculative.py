"""Speculative decoding against plain decoding, side by side in one process: accepted length, target forwards per
generated token and wall time, for each drafter, chain and tree, batch size and temperature.

  GGUF=$(python -c "from configs import smollm2; print(smollm2.gguf_path())")   # the target, SmolLM2-135M
  python benchmarks/speculative.py --init-from=gguf:$GGUF \\
      --draft-config=configs/smollm2_draft.py --draft-workdir=workdirs/smollm2_draft \\
      --ngram-store=workdirs/smollm2/ngrams.npz --batch-sizes=1,8 --temperatures=0,0.8

The target is the --init-from checkpoint (or --workdir's, as benchmarks/superposed.py's load_model). Drafters:
  ngram   prompt lookup in the running context, then the --ngram-store counts (samplers/ngram_draft.py)
  draft   the model of --draft-config restored from --draft-workdir's latest checkpoint, or the --draft-init-from
          checkpoint (hf:DIR or gguf:FILE) (samplers/draft_model.py)
each as a chain of --gamma drafts and as the tree --tree (drafts per node at each depth). Prompts: the first
--batch next-line prompts of the validation split (held-out standard-library files, metrics/drafts.py), --new-tokens
tokens each, no stop tokens. Reported per contender:
  tokens_per_step        tokens a row gains per target forward (the accepted drafts + 1; 1 for plain decoding)
  forwards_per_token     target forwards per generated token, the prefill included (1 for plain decoding)
  seconds, speedup       median wall time of generate_tokens over --repeats (after a compile), round-robin with
                         plain decoding (benchmarks/superposed.py's median_seconds); speedup = plain / speculative
  tokens_equal_plain     at temperature 0, whether the tokens are plain greedy decoding's (they must be)
Writes speculative.json and speculative.png to --out.
"""

import argparse
import functools
import importlib.util
import json
import pathlib

import jax
import numpy as np

from benchmarks.superposed import held_out_prompts, load_model, median_seconds
from checkpoints.manager import Checkpoints
from models import registry
from parallel import mesh as mesh_lib
from samplers import ngram_store
from samplers.draft_model import DraftModel
from samplers.engine import Sampler, SamplerConfig
from samplers.ngram_draft import NgramDraft
from samplers.plain import PlainSampling
from samplers.sampling import SamplingConfig
from samplers.speculative import Speculative, SpeculativeConfig


def load_draft(config_file: str, workdir: str):
    """(model, params) of a config file's model, restored from the workdir's latest checkpoint."""
    spec = importlib.util.spec_from_file_location("draft_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = registry.build(module.get_config().model)
    checkpoints = Checkpoints(workdir)
    if checkpoints.latest_step() is None:
        raise SystemExit(f"--draft-workdir={workdir} has no checkpoint; train the draft first ({config_file})")
    abstract = jax.eval_shape(lambda: mesh_lib.strip_logical_names(
        model.init(jax.random.key(0), *model.example_inputs())["params"]))
    params = checkpoints.restore_params(abstract)
    checkpoints.close()
    return model, params


def summary(sampler, state, num_prompts: int) -> dict:
    spec = state.strategy
    tokens = np.asarray(state.num_tokens_B)[:num_prompts].sum()
    forwards = np.asarray(spec.forwards_B)[:num_prompts].sum()
    steps = forwards - num_prompts  # the prefill is not a verification step
    return {"tokens_per_step": float((np.asarray(spec.accepted_B)[:num_prompts].sum() + steps) / max(steps, 1)),
            "forwards_per_token": float(forwards / tokens)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init-from", default="", help="the target: hf:DIR or gguf:FILE, as config.init_from")
    parser.add_argument("--workdir", default="", help="or a tiny-config workdir: its checkpoint and tokenizer")
    parser.add_argument("--draft-config", default="", help="the draft model's config file")
    parser.add_argument("--draft-workdir", default="")
    parser.add_argument("--draft-init-from", default="", help="or the draft as hf:DIR or gguf:FILE")
    parser.add_argument("--ngram-store", default="", help="an n-gram store file (tools/build_ngrams.py)")
    parser.add_argument("--drafters", default="ngram,draft", help="which of ngram, draft to run")
    parser.add_argument("--gamma", type=int, default=4, help="drafts of a chain")
    parser.add_argument("--tree", default="2,2,1,1", help="the tree's drafts per node at each depth")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--temperatures", default="0,0.8")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="workdirs/bench_speculative")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config, model, params, tokenizer = load_model(args.init_from, args.workdir)
    if tokenizer is None:
        parser.error("held-out prompts need a tokenizer: --init-from, or a --workdir with tokenizer.json")
    drafters = {"ngram": NgramDraft(store=ngram_store.load_ngram_store(args.ngram_store) if args.ngram_store
                                    else None)}
    if args.draft_config:
        drafters["draft"] = DraftModel(*load_draft(args.draft_config, args.draft_workdir))
    elif args.draft_init_from:
        drafters["draft"] = DraftModel(*load_model(args.draft_init_from, "")[1:3])
    drafters = {name: drafters[name] for name in args.drafters.split(",") if name in drafters}
    shapes = {"chain": (1,) * args.gamma, "tree": tuple(int(b) for b in args.tree.split(","))}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    all_prompts = held_out_prompts(config, tokenizer, args.prompt_tokens, args.new_tokens, max(batch_sizes))
    engine_config = SamplerConfig(max_new_tokens=args.new_tokens)

    results = []
    for temperature in (float(t) for t in args.temperatures.split(",")):
        sampling = SamplingConfig(temperature=temperature)
        plain = Sampler(model, params, None, engine_config, PlainSampling(sampling))
        for batch in batch_sizes:
            prompts = all_prompts[:batch]
            plain_tokens = plain.generate_tokens(prompts).tokens
            for (drafter_name, drafter), (shape_name, branching) in [(d, s) for d in drafters.items()
                                                                     for s in shapes.items()]:
                strategy = Speculative(SpeculativeConfig(branching, sampling), drafter)
                sampler = Sampler(model, params, None, engine_config, strategy)
                state = sampler.decode(sampler.prefill(prompts))
                row = {"temperature": temperature, "batch": batch, "drafter": drafter_name, "shape": shape_name,
                       "branching": list(branching), **summary(sampler, state, len(prompts))}
                if temperature == 0:
                    row["tokens_equal_plain"] = sampler.output(state, len(prompts)).tokens == plain_tokens
                row.update(median_seconds({"seconds": functools.partial(sampler.generate_tokens, prompts),
                                           "plain_seconds": functools.partial(plain.generate_tokens, prompts)},
                                          args.repeats))
                row["speedup"] = row["plain_seconds"] / row["seconds"]
                results.append(row)
                print(json.dumps(row), flush=True)

    report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "target": args.init_from or args.workdir or "tiny", "draft": args.draft_workdir or args.draft_init_from,
              "ngram_store": args.ngram_store, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "results": results}
    (out / "speculative.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "speculative.png", report)
    print(f"wrote {out / 'speculative.json'} and {out / 'speculative.png'}")


def plot(results, path, report):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["temperature"], r["batch"]) for r in results})
    contenders = sorted({(r["drafter"], r["shape"]) for r in results})
    fig, (forwards, speedups) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(settings))
    width = 0.8 / len(contenders)
    for i, contender in enumerate(contenders):
        by_setting = {(r["temperature"], r["batch"]): r for r in results if (r["drafter"], r["shape"]) == contender}
        offsets = x - 0.4 + (i + 0.5) * width
        label = f"{contender[0]} {contender[1]}"
        forwards.bar(offsets, [by_setting[s]["forwards_per_token"] for s in settings], width, label=label)
        speedups.bar(offsets, [by_setting[s]["speedup"] for s in settings], width, label=label)
    labels = [f"T={t:g}, batch {b}" for t, b in settings]
    for axis, ylabel in ((forwards, "target forwards per token"), (speedups, "wall-time speed-up")):
        axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        axis.set_xticks(x, labels, fontsize=8)
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=8)
    forwards.set_title("plain decoding: 1 forward per token (dashed)", fontsize=9)
    speedups.set_title("over plain decoding in the same process", fontsize=9)
    fig.suptitle(f"{report['new_tokens']} new tokens, {pathlib.Path(report['target']).name}, {report['backend']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
