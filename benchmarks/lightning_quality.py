"""Quality side by side: the tiny lightning, tiny hybrid and tiny softmax models, same data, same steps.

  python benchmarks/lightning_quality.py --steps=300 --out=benchmarks/results/lightning_quality

Trains each from scratch into OUT/<name> (replacing what is there), evaluates it on the same validation batches,
and writes OUT/lightning_quality.json and a markdown table of validation loss, perplexity and bits per byte.
"""

import argparse
import json
import os
import shutil
import time

import evaluate
import train
from configs import lightning, lm

CONTENDERS = {
    "softmax (configs/lm.py:tiny)": lambda: lm.get_config("tiny"),
    "lightning (configs/lightning.py:tiny)": lambda: lightning.get_config("tiny"),
    "hybrid (configs/lightning.py:tiny_hybrid)": lambda: lightning.get_config("tiny_hybrid"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/lightning_quality")
    args = parser.parse_args()

    rows = []
    for name, make_config in CONTENDERS.items():
        config = make_config()
        config.train.update(num_steps=args.steps, checkpoint_every=args.steps, evaluate_every=0)
        config.evaluate.run = ("validation",)
        workdir = os.path.join(args.out, name.split()[0])
        shutil.rmtree(workdir, ignore_errors=True)
        start = time.perf_counter()
        history = train.train_and_evaluate(config, workdir)
        train_seconds = time.perf_counter() - start
        validation = evaluate.evaluate(config, workdir)["validation"]
        rows.append({"model": name, "steps": args.steps, "final_train_loss": history[-1]["loss"],
                     "validation_loss": validation["loss"], "perplexity": validation["perplexity"],
                     "bits_per_byte": validation["bits_per_byte"], "train_seconds": train_seconds})

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lightning_quality.json"), "w") as f:
        json.dump(rows, f, indent=2)
    table = ["| model | steps | train loss | validation loss | perplexity | bits/byte | train s |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['steps']} | {r['final_train_loss']:.3f} | {r['validation_loss']:.3f} | "
              f"{r['perplexity']:.1f} | {r['bits_per_byte']:.3f} | {r['train_seconds']:.0f} |" for r in rows]
    with open(os.path.join(args.out, "lightning_quality.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
