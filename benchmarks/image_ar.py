"""Diffusion steps per image token, side by side in one process: constant T_up, DiSA annealing from T_up to T_low,
constant T_low; images per second and GenEval accuracy on the shapes world's held-out (or seen) prompts.

  python benchmarks/image_ar.py --workdir workdirs/image_ar --out workdirs/bench_image_ar

The model is the latest checkpoint of --workdir, trained with configs/image_ar.py:--preset (default shapes), with
its tokenizer; without a checkpoint, a random initialisation and a tokenizer trained on the world's captions (speed
only: its images are noise). Each schedule of --schedules (STRATEGY:T_UP[:T_LOW], samplers/disa.py; default
constant 50, MAR's constant 100, DiSA's linear, cosine and two-stage 50 -> 5, constant 5) samples the same prompts
(--prompts-per-task prompts of each task, held-out ones unless --prompts=seen, --images-per-prompt images each, one
engine call of all of them) with the same seed and the sampler settings of config.evaluate.image_generation.denoise
(DDPM, guidance 3 by default); reported:
  diffusion_steps_per_image   the schedule's steps summed over the image's tokens (each runs the head once on the
                              conditional and null rows together)
  seconds, images_per_second  median wall time of the whole call over --repeats, taken round-robin after a warm-up
                              compile (benchmarks/superposed.py's median_seconds)
  speedup                     images_per_second over the first schedule's
  geneval                     metrics/geneval_shapes.py's accuracy per task and overall on the warm-up's images
Every 50 -> 5 schedule averages ~27.5 steps a token, so against constant 50 its speed-up is below 50 / 27.5 = 1.8x
whatever the backbone costs; DiSA's ~5x for MAR is against MAR's 100 steps with 256 -> 64 AR iterations (this model's
AR steps are fixed at one a token). Writes image_ar.json and image_ar.png (images/s and accuracy per schedule) to
--out.
"""

import argparse
import functools
import json
import pathlib

import jax
import numpy as np

from benchmarks.superposed import median_seconds
from checkpoints import restore
from configs import image_ar as image_ar_config
from data import image_pipeline, shapes_world, tokenizer as tokenizer_lib
from evaluators import image_generation
from metrics import geneval_shapes
from models import registry
from parallel import mesh as mesh_lib
from samplers.denoise import DenoiseConfig
from samplers.disa import StepSchedule
from samplers.engine import Sampler, SamplerConfig
from samplers.image_tokens import DiffusionTokens


def load(preset: str, workdir: str):
    """(config, model, params, tokenizer, source of the params)."""
    config = image_ar_config.get_config(preset)
    model = registry.build(config.model)

    def initialise():
        return mesh_lib.strip_logical_names(model.init(jax.random.key(0), *model.example_inputs())["params"])

    params, _, source = restore.params(config, workdir, jax.eval_shape(initialise), initialise=initialise)
    tokenizer = tokenizer_lib.existing_tokenizer(config.data, workdir, config.model.vocab_size)
    if tokenizer is None:
        captions = [{"caption": p["prompt"].encode()} for task in shapes_world.TASKS
                    for p in shapes_world.task_prompts(task)]
        tokenizer = tokenizer_lib.train_tokenizer(config.data, captions, config.model.vocab_size)
    return config, model, params, tokenizer, source


def parse_schedule(text: str) -> StepSchedule:
    strategy, *steps = text.split(":")
    up = int(steps[0])
    return StepSchedule(strategy, up, int(steps[1]) if len(steps) > 1 else up)


def measure(model, params, rows, specs, schedules, denoise: DenoiseConfig, repeats: int, seed: int) -> list[dict]:
    K = model.config.num_image_tokens
    runs = {schedule: functools.partial(Sampler(model, params, None, SamplerConfig(max_new_tokens=K),
                                                DiffusionTokens(denoise, schedule)).generate_tokens, rows, seed=seed)
            for schedule in schedules}
    scores = {schedule: geneval_shapes.score(run(), specs) for schedule, run in runs.items()}  # also the compiles
    seconds = median_seconds(runs, repeats, compiled=True)
    results = []
    for schedule in schedules:
        row = {"strategy": schedule.strategy, "steps_up": schedule.steps_up, "steps_low": schedule.steps_low,
               "diffusion_steps_per_image": int(schedule.table(K).sum()), "seconds": seconds[schedule],
               "images_per_second": len(rows) / seconds[schedule], "geneval": scores[schedule]}
        row["speedup"] = row["images_per_second"] / results[0]["images_per_second"] if results else 1.0
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="", help="a configs/image_ar.py run: its checkpoint and tokenizer")
    parser.add_argument("--preset", default="shapes", choices=image_ar_config.PRESETS)
    parser.add_argument("--schedules",
                        default="constant:50,constant:100,linear:50:5,cosine:50:5,two_stage:50:5,constant:5")
    parser.add_argument("--prompts", default="held_out", choices=image_generation.PROMPT_SETS,
                        help="the test split's held-out prompts or the train split's seen ones")
    parser.add_argument("--prompts-per-task", type=int, default=2)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="workdirs/bench_image_ar")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config, model, params, tokenizer, source = load(args.preset, args.workdir)
    prompts = image_generation.evaluation_prompts(args.prompts, config.data.world.held_out_fraction,
                                                  args.prompts_per_task, config.seed)
    specs = [prompt for prompt in prompts for _ in range(args.images_per_prompt)]
    rows = [image_pipeline.prompt_tokens(tokenizer, spec["prompt"], config.data.caption_tokens)[0].tolist()
            for spec in specs]
    denoise = DenoiseConfig(**config.evaluate.image_generation.denoise)
    schedules = [parse_schedule(text) for text in args.schedules.split(",")]
    results = measure(model, params, rows, specs, schedules, denoise, args.repeats, config.seed)
    report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "preset": args.preset,
              "params": source, "prompts": args.prompts, "images": len(rows),
              "image_tokens": model.config.num_image_tokens, "repeats": args.repeats,
              "denoise": config.evaluate.image_generation.denoise.to_dict(), "results": results}
    (out / "image_ar.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "image_ar.png")
    print(f"wrote {out / 'image_ar.json'} and {out / 'image_ar.png'}")


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = [f"{r['strategy']} {r['steps_up']}" + (f"->{r['steps_low']}" if r["steps_low"] != r["steps_up"] else "")
             for r in results]
    x = np.arange(len(results))
    fig, (speed, quality) = plt.subplots(1, 2, figsize=(11, 4.5))
    speed.bar(x, [r["images_per_second"] for r in results])
    for xi, r in zip(x, results):
        speed.annotate(f"{r['speedup']:.2f}x\n{r['diffusion_steps_per_image']} steps", (xi, r["images_per_second"]),
                       ha="center", va="bottom", fontsize=8)
    speed.set_xticks(x, names, rotation=30, fontsize=8)
    speed.set_ylabel("images per second")
    tasks = [task for task in results[0]["geneval"] if task != "overall"] + ["overall"]
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(zip(names, results)):
        quality.bar(np.arange(len(tasks)) + (i - (len(results) - 1) / 2) * width, [r["geneval"][t] for t in tasks],
                    width, label=name)
    quality.set_xticks(np.arange(len(tasks)), tasks, rotation=30, fontsize=8)
    quality.set_ylabel("GenEval accuracy (shapes world)")
    quality.set_ylim(0, 1)
    quality.legend(fontsize=8)
    fig.suptitle(f"{report['images']} images of {report['image_tokens']} tokens, {report['params']}, "
                 f"{report['backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
