"""A compositional world of flat shapes on a 32x32 canvas, with prompts in GenEval's six tasks and metadata format.

An image is a black background with one to four hard-edged (not anti-aliased) objects, each one of SHAPES in one
of COLORS, drawn in a square box of side MIN_SIZE..MAX_SIZE. Boxes keep MIN_GAP background pixels between them, so
every object is its own connected component and metrics/geneval_shapes.py can score images exactly.

A prompt is GenEval's metadata (djghosh13/geneval, prompts/create_prompts.py): {"tag", "include", "exclude",
"prompt"}, with shape names as classes and colour names as colours, e.g.
  {"tag": "position", "include": [{"class": "square", "count": 1},
   {"class": "circle", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a circle left of a square"}
Each task's prompts are split once into seen ones (train, validation) and held-out ones (test) by a stable hash of
the prompt up to restatement ("X and Y" is "Y and X", "X left of Y" is "Y right of X").
"""

import dataclasses
import functools
import hashlib
import json

import numpy as np

from errors import checks

IMAGE_SIZE = 32
BACKGROUND_RGB = (0, 0, 0)
# Corners of the RGB cube: every colour is 255 from the background and >= 255 from every other colour.
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
          "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
SHAPES = ("square", "circle", "triangle", "cross", "diamond")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses",
           "diamond": "diamonds"}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE_RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
MIN_SIZE, MAX_SIZE = 6, 12
MIN_GAP = 2
POSITION_THRESHOLD = 0.1  # GenEval's: centre offsets shrink by this times the sum of the two boxes' sizes
SPLITS = ("train", "validation", "test")
HELD_OUT_SPLITS = ("test",)

_LAYOUT_TRIES = 1000
_PLACEMENT_TRIES = 50


@dataclasses.dataclass(frozen=True)
class WorldObject:
    """One drawn object; box = (x1, y1, x2, y2) in pixel edges, so x2 - x1 is its width in pixels."""

    shape: str
    color: str
    box: tuple[int, int, int, int]


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """The bool mask_HW of `shape` filling a height x width box; it touches all four sides of the box.

    Integer arithmetic on doubled offsets from the box centre (x2 = 2*col + 1 - width) keeps the masks exact.
    The result is cached and read-only.
    """
    checks.choice("shape", shape, SHAPES)
    rows, cols = np.mgrid[:height, :width]
    x2, y2 = np.abs(2 * cols + 1 - width), np.abs(2 * rows + 1 - height)
    if shape == "square":
        mask_HW = np.ones((height, width), bool)
    elif shape == "circle":
        mask_HW = x2**2 * height**2 + y2**2 * width**2 <= width**2 * height**2
    elif shape == "triangle":  # apex up: the half-width grows linearly to the full box at the bottom row
        mask_HW = x2 * height <= (rows + 1) * width
    elif shape == "cross":  # a plus sign with bars a third of the box thick
        mask_HW = (3 * x2 <= width) | (3 * y2 <= height)
    else:  # diamond
        mask_HW = x2 * height + y2 * width <= width * height
    mask_HW.setflags(write=False)
    return mask_HW


def render(objects) -> np.ndarray:
    """The uint8 image_HWC of the objects on the background."""
    image_HWC = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image_HWC[:] = BACKGROUND_RGB
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        image_HWC[y1:y2, x1:x2][shape_mask(obj.shape, y2 - y1, x2 - x1)] = COLORS[obj.color]
    return image_HWC


def relative_position(box_a, box_b) -> set[str]:
    """The relations of box a to box b by GenEval's rule (evaluation/evaluate_images.py: relative_position)."""
    boxes = np.array([box_a, box_b], np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised_offset = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised_offset) < 1e-3):
        return set()
    dx, dy = revised_offset / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:  # image rows grow downwards
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


# Prompts.

def task_prompts(task: str) -> list[dict]:
    """Every prompt of a task, in a fixed order."""
    checks.choice("task", task, TASKS)
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if task == "single_object":
        return [_prompt(task, f"a photo of a {x}", [_clause(x)]) for x in SHAPES]
    if task == "two_object":
        return [_prompt(task, f"a photo of a {x} and a {y}", [_clause(x), _clause(y)]) for x, y in pairs]
    if task == "counting":
        return [_prompt(task, f"a photo of {word} {PLURALS[x]}", [_clause(x, n)], exclude=[_clause(x, n + 1)])
                for x in SHAPES for n, word in COUNT_WORDS.items()]
    if task == "colors":
        return [_prompt(task, f"a photo of a {c} {x}", [_clause(x, color=c)]) for x in SHAPES for c in COLORS]
    if task == "position":
        # The target (b) comes first: GenEval's position clause names the include group it is relative to.
        return [_prompt(task, f"a photo of a {a} {r} a {b}", [_clause(b), _clause(a, position=[r, 0])])
                for a, b in pairs for r in RELATIONS]
    # color_attr
    return [_prompt(task, f"a photo of a {c} {x} and a {d} {y}", [_clause(x, color=c), _clause(y, color=d)])
            for x, y in pairs for c in COLORS for d in COLORS if c != d]


def _clause(shape, count=1, *, color=None, position=None) -> dict:
    clause = {"class": shape, "count": count}
    if color is not None:
        clause["color"] = color
    if position is not None:
        clause["position"] = position
    return clause


def _prompt(task, text, include, exclude=()) -> dict:
    return {"tag": task, "include": include, "exclude": list(exclude), "prompt": text}


def prompt_identity(prompt: dict) -> str:
    """What a prompt asks for, the same for its restatements ("X and Y" / "Y and X", "X left of Y" / "Y right of X")."""
    include = prompt["include"]
    if prompt["tag"] == "position":
        (target, placed), relation = include, include[1]["position"][0]
        if relation in ("right of", "below"):
            placed, target, relation = target, placed, OPPOSITE_RELATIONS[relation]
        asked = [placed["class"], relation, target["class"]]
    else:
        asked = sorted([clause["class"], clause["count"], clause.get("color", "")] for clause in include)
    return json.dumps([prompt["tag"], asked])


def split_prompts(held_out_fraction: float) -> tuple[dict, dict]:
    """({task: seen prompts}, {task: held-out prompts}): per task, the identities with the smallest hashes, a
    held_out_fraction of them (at least one, and never all), are held out, with all their restatements."""
    checks.number("held_out_fraction", held_out_fraction, above=0, below=1)
    seen, held_out = {}, {}
    for task in TASKS:
        prompts = task_prompts(task)
        identities = sorted({prompt_identity(p) for p in prompts}, key=lambda i: hashlib.sha256(i.encode()).digest())
        num_held_out = min(max(1, round(held_out_fraction * len(identities))), len(identities) - 1)
        held = set(identities[:num_held_out])
        seen[task] = [p for p in prompts if prompt_identity(p) not in held]
        held_out[task] = [p for p in prompts if prompt_identity(p) in held]
    return seen, held_out


# Scenes.

def sample_scene(prompt: dict, rng: np.random.Generator) -> list[WorldObject]:
    """Objects that show exactly what the prompt asks: its objects and no others, colours not named drawn at random,
    a position prompt's pair in exactly the named relation (and no other) by GenEval's rule."""
    wanted = [(clause["class"], clause.get("color")) for clause in prompt["include"] for _ in range(clause["count"])]
    # A position prompt's clauses are (target, placed object): boxes[1] must stand in the relation to boxes[0].
    relation = prompt["include"][1]["position"][0] if prompt["tag"] == "position" else None
    for _ in range(_LAYOUT_TRIES):
        boxes = _try_layout(len(wanted), rng)
        if boxes is not None and (relation is None or relative_position(boxes[1], boxes[0]) == {relation}):
            break
    else:
        raise RuntimeError(f"no layout found in {_LAYOUT_TRIES} tries for {prompt['prompt']!r}")
    names = list(COLORS)
    return [WorldObject(shape, color or names[rng.integers(len(names))], box)
            for (shape, color), box in zip(wanted, boxes)]


def _try_layout(count: int, rng: np.random.Generator) -> list | None:
    """count boxes of random sizes at random places, MIN_GAP apart, or None if one did not fit."""
    boxes = []
    for size in rng.integers(MIN_SIZE, MAX_SIZE + 1, size=count):
        for _ in range(_PLACEMENT_TRIES):
            x, y = rng.integers(0, IMAGE_SIZE - size + 1, size=2)
            box = (int(x), int(y), int(x + size), int(y + size))
            if all(_separated(box, other) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _separated(a, b) -> bool:
    return (a[2] + MIN_GAP <= b[0] or b[2] + MIN_GAP <= a[0]
            or a[3] + MIN_GAP <= b[1] or b[3] + MIN_GAP <= a[1])


def generate_split(split: str, num_examples: int, seed: int, held_out_fraction: float):
    """Yields the split's examples {image, caption, task, spec, objects}; spec is the prompt and objects the drawn
    objects, both as JSON. Example i has task TASKS[i % 6], so every split of >= 6 examples has every task, and
    depends only on (seed, split, i). The test split draws held-out prompts, train and validation the others."""
    checks.choice("split", split, SPLITS)
    checks.integer("num_examples", num_examples, minimum=1)
    checks.integer("seed", seed, minimum=0)
    seen, held_out = split_prompts(held_out_fraction)
    prompts = held_out if split in HELD_OUT_SPLITS else seen
    for index in range(num_examples):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        task = TASKS[index % len(TASKS)]
        prompt = prompts[task][rng.integers(len(prompts[task]))]
        objects = sample_scene(prompt, rng)
        yield {
            "image": render(objects),
            "caption": prompt["prompt"],
            "task": task,
            "spec": json.dumps(prompt),
            "objects": json.dumps([dataclasses.asdict(obj) for obj in objects]),
        }
