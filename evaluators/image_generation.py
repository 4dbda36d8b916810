"""Images of prompts by the image model (models/image_ar.py) sampled through the decode engine
(samplers/image_tokens.py), scored by GenEval's rules on the shapes world (metrics/geneval_shapes.py).

For each of GenEval's six tasks, prompts_per_task prompts (a fixed draw by config.seed) get images_per_prompt images
each: by default prompts the train split never shows (prompts="held_out", data/shapes_world.py's held-out ones:
compositional generalisation), or with prompts="seen" the train split's own captions (whether the model follows
captions at all). Results: the scorer's accuracy per task and overall (their mean, GenEval's score), which train.py
writes to the metrics stream as eval/image_generation/geneval/<task>; and a PNG grid per prompt, its images side by
side, in WORKDIR/image_generation/<task>_<n>.png with prompts.json naming each file's caption (rewritten by every
run).

config.evaluate.image_generation: prompts ("held_out" | "seen"), prompts_per_task, images_per_prompt, batch_size
(rows per engine call), denoise (samplers.denoise.DenoiseConfig's fields: method, temperature, guidance_scale,
clip_x0) and steps (DiSA's schedule, samplers.disa.StepSchedule's fields: strategy, steps_up, steps_low).
"""

import json
import os

import jax
import numpy as np
from PIL import Image

from data import image_pipeline, shapes_world
from errors import InputError, checks
from metrics import geneval_shapes
from samplers.denoise import DenoiseConfig
from samplers.disa import StepSchedule
from samplers.engine import Sampler, SamplerConfig
from samplers.image_tokens import DiffusionTokens

GAP = 2  # background pixels between the images of a grid
PROMPT_SETS = ("held_out", "seen")


def strategy(section, key: str = "config.evaluate.image_generation") -> DiffusionTokens:
    """The sampler of section.denoise (DenoiseConfig's fields) and section.steps (StepSchedule's); errors name the
    keys."""
    parts = {}
    for name, kind in (("denoise", DenoiseConfig), ("steps", StepSchedule)):
        try:
            parts[name] = kind(**section[name])
        except InputError as error:
            raise InputError(f"{key}.{name}.{error}") from None
        except TypeError as error:
            raise InputError(f"{key}.{name}={dict(section[name])}: {error}") from None
    return DiffusionTokens(parts["denoise"], parts["steps"])


def validate(section, config) -> None:
    checks.choice("config.evaluate.image_generation.prompts", section.prompts, PROMPT_SETS)
    for name in ("prompts_per_task", "images_per_prompt", "batch_size"):
        checks.integer(f"config.evaluate.image_generation.{name}", section[name], minimum=1)
    strategy(section)
    if config.data.corpus != "shapes_world":
        raise InputError(f"config.evaluate.run lists image_generation, which needs config.data.corpus='shapes_world' "
                         f"(config.data.corpus={config.data.corpus!r})")


def evaluation_prompts(prompt_set: str, held_out_fraction: float, per_task: int, seed: int) -> list[dict]:
    """per_task prompts of each task from prompt_set (PROMPT_SETS; all of a task's if it has fewer), a fixed draw
    by seed."""
    seen, held_out = shapes_world.split_prompts(held_out_fraction)
    by_task = {"held_out": held_out, "seen": seen}[prompt_set]
    rng = np.random.default_rng(seed)
    chosen = []
    for task in shapes_world.TASKS:
        prompts = by_task[task]
        chosen += [prompts[i] for i in sorted(rng.permutation(len(prompts))[:per_task])]
    return chosen


def generate(sampler: Sampler, rows: list[list[int]], batch_size: int, seed: int) -> np.ndarray:
    """uint8 images [len(rows), H, W, 3], batch_size rows per engine call, call i seeded seed + i."""
    images = [sampler.generate_tokens(rows[start:start + batch_size], seed=seed + i)
              for i, start in enumerate(range(0, len(rows), batch_size))]
    return np.concatenate(images)


def grid(images_NHWC: np.ndarray) -> np.ndarray:
    """The images in a row, GAP background pixels apart."""
    N, H, W, C = images_NHWC.shape
    canvas = np.zeros((H, N * W + (N - 1) * GAP, C), np.uint8)
    canvas[:] = shapes_world.BACKGROUND_RGB
    for n, image in enumerate(images_NHWC):
        canvas[:, n * (W + GAP):n * (W + GAP) + W] = image
    return canvas


class Evaluator:
    def __init__(self, section, context):
        self.section, self.context = section, context
        config = context.config
        self.prompts = evaluation_prompts(section.prompts, config.data.world.held_out_fraction,
                                          section.prompts_per_task, config.seed)
        self.rows = [image_pipeline.prompt_tokens(context.tokenizer, prompt["prompt"], config.data.caption_tokens)[0]
                     .tolist() for prompt in self.prompts for _ in range(section.images_per_prompt)]
        self.strategy = strategy(section)

    def run(self, params) -> dict:
        ctx, section = self.context, self.section
        engine_config = SamplerConfig(max_new_tokens=ctx.model.config.num_image_tokens)
        sampler = Sampler(ctx.model, params, ctx.tokenizer, engine_config, self.strategy, mesh=ctx.mesh,
                          rules=ctx.rules)
        images = generate(sampler, self.rows, section.batch_size, ctx.config.seed)
        specs = [prompt for prompt in self.prompts for _ in range(section.images_per_prompt)]
        scores = geneval_shapes.score(images, specs)
        if jax.process_index() == 0:
            self.write_grids(images)
        return {"prompts": len(self.prompts), "images": len(images), "geneval": scores}

    def write_grids(self, images_NHWC: np.ndarray) -> None:
        directory = os.path.join(self.context.workdir, "image_generation")
        os.makedirs(directory, exist_ok=True)
        per_prompt = images_NHWC.reshape(len(self.prompts), self.section.images_per_prompt, *images_NHWC.shape[1:])
        captions, counts = {}, {}
        for prompt, images in zip(self.prompts, per_prompt):
            counts[prompt["tag"]] = counts.get(prompt["tag"], -1) + 1
            name = f"{prompt['tag']}_{counts[prompt['tag']]}.png"
            Image.fromarray(grid(images)).save(os.path.join(directory, name))
            captions[name] = prompt["prompt"]
        with open(os.path.join(directory, "prompts.json"), "w") as file:
            json.dump(captions, file, indent=2)

    def report(self, results: dict) -> None:
        scores = results["geneval"]
        which = self.section.prompts.replace("_", "-")
        print(f"GenEval on the shapes world, {results['prompts']} {which} prompts, {results['images']} images "
              f"(grids in {os.path.join(self.context.workdir, 'image_generation')}):")
        for task, accuracy in scores.items():
            print(f"  {task:<14} {accuracy:.3f}")
