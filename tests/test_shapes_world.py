"""The shapes world: its TFDS builder (array_record, no TensorFlow), GenEval-style prompts with held-out ones, and
the exact GenEval scorer in metrics/geneval_shapes.py."""

import json
import pathlib
import re
import sys

import numpy as np
import pytest
import scipy.ndimage

from data import shapes_dataset, shapes_world
from errors import InputError
from metrics import geneval_shapes

TINY_SIZES = {"num_train": 12, "num_validation": 6, "num_test": 6}
HELD_OUT_FRACTION = 0.2
CAPTION_FORMS = {
    "single_object": r"a photo of a (\w+)",
    "two_object": r"a photo of a (\w+) and a (\w+)",
    "counting": r"a photo of (two|three|four) (\w+)",
    "colors": r"a photo of a (\w+) (\w+)",
    "position": r"a photo of a (\w+) (left of|right of|above|below) a (\w+)",
    "color_attr": r"a photo of a (\w+) (\w+) and a (\w+) (\w+)",
}


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return data_dir, shapes_dataset.load_splits(str(data_dir), shapes_dataset.world_config(**TINY_SIZES))


@pytest.fixture(scope="module")
def rendered():
    """A few hundred examples: 300 of train, 60 of test (held-out prompts)."""
    return (list(shapes_world.generate_split("train", 300, 0, HELD_OUT_FRACTION))
            + list(shapes_world.generate_split("test", 60, 0, HELD_OUT_FRACTION)))


def assert_one_line_input_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def as_arrays(examples):
    return np.stack([example["image"] for example in examples]), [example["spec"] for example in examples]


# The world.

def test_shape_masks_fill_their_box_and_differ_at_every_drawn_size():
    for size in range(shapes_world.MIN_SIZE, shapes_world.MAX_SIZE + 1):
        masks = [shapes_world.shape_mask(shape, size, size) for shape in shapes_world.SHAPES]
        for shape, mask_HW in zip(shapes_world.SHAPES, masks):
            # Touching all four sides makes a detection's bounding box the box the object was drawn in.
            assert mask_HW[0].any() and mask_HW[-1].any() and mask_HW[:, 0].any() and mask_HW[:, -1].any(), shape
            assert geneval_shapes.connected_components(mask_HW)[1] == 1, (shape, size)
            assert mask_HW.sum() > geneval_shapes.MIN_AREA, (shape, size)
            assert geneval_shapes.classify_shape(mask_HW) == shape, (shape, size)
        assert len({mask_HW.tobytes() for mask_HW in masks}) == len(masks)


def test_relative_position_follows_genevals_centre_offset_rule():
    left, right = (0, 10, 8, 18), (20, 10, 28, 18)
    assert shapes_world.relative_position(left, right) == {"left of"}
    assert shapes_world.relative_position(right, left) == {"right of"}
    assert shapes_world.relative_position((10, 0, 18, 8), (10, 20, 18, 28)) == {"above"}
    assert shapes_world.relative_position((0, 0, 8, 8), (20, 20, 28, 28)) == {"left of", "above"}
    # Centres 6 apart with sizes 8 + 8: the offset shrinks by 0.1 * 16 to 4.4, normalised 0.73 > 0.5.
    assert shapes_world.relative_position((0, 0, 8, 8), (6, 0, 14, 8)) == {"left of"}
    # Centres 1 apart along x with sizes 12 + 12: the shrunk offset is 0, so no relation.
    assert shapes_world.relative_position((0, 0, 12, 12), (1, 0, 13, 12)) == set()


def test_prompts_cover_six_tasks_and_held_out_ones_include_their_restatements():
    seen, held_out = shapes_world.split_prompts(HELD_OUT_FRACTION)
    assert tuple(seen) == tuple(held_out) == shapes_world.TASKS
    for task in shapes_world.TASKS:
        all_prompts = shapes_world.task_prompts(task)
        assert seen[task] and held_out[task]
        assert sorted(p["prompt"] for p in seen[task] + held_out[task]) == sorted(p["prompt"] for p in all_prompts)
        held_identities = {shapes_world.prompt_identity(p) for p in held_out[task]}
        assert not held_identities & {shapes_world.prompt_identity(p) for p in seen[task]}
        for prompt in all_prompts:
            assert re.fullmatch(CAPTION_FORMS[task], prompt["prompt"]), prompt["prompt"]
    held_positions = {p["prompt"] for p in held_out["position"]}
    for prompt in held_out["position"]:
        a, relation, b = re.fullmatch(CAPTION_FORMS["position"], prompt["prompt"]).groups()
        assert f"a photo of a {b} {shapes_world.OPPOSITE_RELATIONS[relation]} a {a}" in held_positions
    held_pairs = {p["prompt"] for p in held_out["two_object"]}
    for prompt in held_out["two_object"]:
        a, b = re.fullmatch(CAPTION_FORMS["two_object"], prompt["prompt"]).groups()
        assert f"a photo of a {b} and a {a}" in held_pairs


def test_held_out_prompts_never_appear_in_train(rendered):
    _, held_out = shapes_world.split_prompts(HELD_OUT_FRACTION)
    held_identities = {shapes_world.prompt_identity(p) for prompts in held_out.values() for p in prompts}
    assert not {e["caption"] for e in rendered[:300]} & {e["caption"] for e in rendered[300:]}
    train_identities = {shapes_world.prompt_identity(json.loads(example["spec"])) for example in rendered[:300]}
    assert not train_identities & held_identities
    test_identities = {shapes_world.prompt_identity(json.loads(example["spec"])) for example in rendered[300:]}
    assert test_identities <= held_identities


def test_images_show_exactly_the_objects_of_their_prompt(rendered):
    for example in rendered:
        objects = json.loads(example["objects"])
        spec = json.loads(example["spec"])
        assert example["caption"] == spec["prompt"] and example["task"] == spec["tag"]
        assert sorted(o["shape"] for o in objects) == sorted(
            c["class"] for c in spec["include"] for _ in range(c["count"]))
        detections = geneval_shapes.detect(example["image"])
        found = sorted((shape, d["color"], list(d["box"])) for shape, ds in detections.items() for d in ds)
        assert found == sorted((o["shape"], o["color"], o["box"]) for o in objects), example["caption"]
        assert 1 <= len(objects) <= 4
    image_HWC = rendered[0]["image"]
    assert image_HWC.shape == (32, 32, 3) and image_HWC.dtype == np.uint8
    assert (image_HWC == shapes_world.BACKGROUND_RGB).all(-1).any()


def test_captions_name_the_drawn_colours_and_relations(rendered):
    for example in rendered:
        objects = json.loads(example["objects"])
        groups = re.fullmatch(CAPTION_FORMS[example["task"]], example["caption"]).groups()
        if example["task"] == "colors":
            assert [(o["color"], o["shape"]) for o in objects] == [groups]
        elif example["task"] == "color_attr":
            assert [(o["color"], o["shape"]) for o in objects] == [groups[:2], groups[2:]]
        elif example["task"] == "position":
            target, placed = objects
            assert (placed["shape"], target["shape"]) == (groups[0], groups[2])
            assert shapes_world.relative_position(placed["box"], target["box"]) == {groups[1]}


# The TFDS builder.

def test_builder_writes_array_record_in_generation_order_with_all_tasks(tiny_sources):
    data_dir, sources = tiny_sources
    written = sorted(p.name.split(".")[0] for p in pathlib.Path(data_dir).glob("shapes_world/*/1.0.0/*.array_record-*"))
    assert written == ["shapes_world-test", "shapes_world-train", "shapes_world-validation"]
    assert {split: len(source) for split, source in sources.items()} == {
        "train": 12, "validation": 6, "test": 6}
    for split, source in sources.items():
        arrays = shapes_dataset.split_arrays(source)
        assert arrays["image"].shape == (len(source), 32, 32, 3) and arrays["image"].dtype == np.uint8
        assert set(arrays["task"]) == set(shapes_world.TASKS)
        expected = list(shapes_world.generate_split(split, len(source), 0, HELD_OUT_FRACTION))
        np.testing.assert_array_equal(arrays["image"], np.stack([e["image"] for e in expected]))
        for key in ("caption", "task", "spec", "objects"):
            assert arrays[key].tolist() == [e[key] for e in expected]
    train_captions = set(shapes_dataset.split_arrays(sources["train"])["caption"])
    assert not train_captions & set(shapes_dataset.split_arrays(sources["test"])["caption"])
    assert "tensorflow" not in sys.modules


def test_a_second_build_gives_identical_bytes_and_another_seed_other_images(tiny_sources, tmp_path):
    data_dir, sources = tiny_sources
    again = shapes_dataset.load_splits(str(tmp_path), shapes_dataset.world_config(**TINY_SIZES))
    first_files = sorted(pathlib.Path(data_dir).glob("shapes_world/*/1.0.0/*.array_record-*"))
    second_files = sorted(tmp_path.glob("shapes_world/*/1.0.0/*.array_record-*"))
    assert [p.name for p in first_files] == [p.name for p in second_files]
    for first, second in zip(first_files, second_files):
        assert first.read_bytes() == second.read_bytes()
    np.testing.assert_array_equal(shapes_dataset.split_arrays(again["train"])["image"],
                                  shapes_dataset.split_arrays(sources["train"])["image"])
    other_config = shapes_dataset.world_config(seed=1, **TINY_SIZES)
    assert other_config.name != shapes_dataset.world_config(**TINY_SIZES).name
    other = shapes_dataset.load_splits(str(tmp_path), other_config)
    assert not np.array_equal(shapes_dataset.split_arrays(other["train"])["image"],
                              shapes_dataset.split_arrays(sources["train"])["image"])


@pytest.mark.parametrize("overrides, needles", [
    ({"num_train": 0}, ("num_train=0", ">= 1")),
    ({"num_test": 2.5}, ("num_test=2.5", "integer")),
    ({"seed": -1}, ("seed=-1", ">= 0")),
    ({"held_out_fraction": 1.0}, ("held_out_fraction=1.0", "< 1")),
])
def test_config_errors_are_one_line_and_name_key_and_value(overrides, needles):
    with pytest.raises(InputError) as excinfo:
        shapes_dataset.world_config(**{**TINY_SIZES, **overrides})
    assert_one_line_input_error(excinfo, *needles)


# The scorer.

def test_connected_components_match_scipy():
    rng = np.random.default_rng(0)
    for density in (0.0, 0.2, 0.45, 0.6, 1.0):
        mask_HW = rng.random((32, 32)) < density
        ours_HW, count = geneval_shapes.connected_components(mask_HW)
        theirs_HW, their_count = scipy.ndimage.label(mask_HW, structure=np.ones((3, 3)))
        assert count == their_count
        np.testing.assert_array_equal(ours_HW, theirs_HW)


def test_score_is_one_on_every_task_of_rendered_images(rendered):
    images_NHWC, specs = as_arrays(rendered)
    scores = geneval_shapes.score(images_NHWC, specs)
    assert scores == {**{task: 1.0 for task in shapes_world.TASKS}, "overall": 1.0}


def test_noise_below_the_area_threshold_is_ignored(rendered):
    images_NHWC, specs = as_arrays(rendered)
    noisy_NHWC = images_NHWC.copy()
    background_NHW = (images_NHWC == shapes_world.BACKGROUND_RGB).all(-1)
    # Isolated speckles (one pixel with a free 3x3 neighbourhood) in the palette's colours.
    free_NHW = scipy.ndimage.minimum_filter(background_NHW, size=(1, 3, 3), mode="constant", cval=False)
    rng = np.random.default_rng(0)
    for index in range(len(noisy_NHWC)):
        rows, cols = np.nonzero(free_NHW[index])
        picks = rng.choice(len(rows), size=3, replace=False)
        noisy_NHWC[index, rows[picks], cols[picks]] = shapes_world.COLORS["yellow"]
    assert geneval_shapes.score(noisy_NHWC, specs)["overall"] == 1.0
    # A blob of MIN_AREA pixels (a 2x5 bar, away from the objects) is detected as one more object.
    counting = [i for i, e in enumerate(rendered) if e["task"] == "counting"]
    for index in counting:  # away from the objects and the speckles
        row, col = free_spot((noisy_NHWC[index] == shapes_world.BACKGROUND_RGB).all(-1), 2, 5)
        noisy_NHWC[index, row:row + 2, col:col + 5] = shapes_world.COLORS["red"]
    detected = [sum(len(ds) for ds in geneval_shapes.detect(noisy_NHWC[i]).values()) for i in counting]
    assert detected == [len(json.loads(rendered[i]["objects"])) + 1 for i in counting]


def test_coloured_noise_holds_no_objects(rendered):
    """What an untrained image model draws (speckled colours, patchy blobs) passes no task, not even single_object."""
    _, specs = as_arrays(rendered)
    rng = np.random.default_rng(0)
    palette_K3 = np.array(list(shapes_world.COLORS.values()) + [shapes_world.BACKGROUND_RGB], np.uint8)
    speckled_NHWC = palette_K3[rng.integers(0, len(palette_K3), (len(specs), 32, 32))]
    patchy_NHWC = np.kron(palette_K3[rng.integers(0, len(palette_K3), (len(specs), 8, 8))],
                          np.ones((1, 4, 4, 1), np.uint8))
    uniform_NHWC = rng.integers(0, 256, (len(specs), 32, 32, 3), dtype=np.uint8)
    for images_NHWC in (speckled_NHWC, patchy_NHWC, uniform_NHWC):
        assert geneval_shapes.score(images_NHWC, specs)["overall"] == 0.0


def free_spot(background_HW, height, width) -> tuple[int, int]:
    """The first top-left corner where a height x width block and a 1-pixel ring around it are background."""
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(background_HW, 1, constant_values=True),
                                                       (height + 2, width + 2))
    rows, cols = np.nonzero(windows.all(axis=(-2, -1)))
    return int(rows[0]), int(cols[0])


def test_clauses_judge_only_the_most_confident_detections_as_geneval_does():
    # GenEval checks a clause's colour and position on its `count` most confident detections; here the largest.
    big_blue = shapes_world.WorldObject("circle", "blue", (0, 0, 12, 12))
    small_red = shapes_world.WorldObject("circle", "red", (20, 20, 27, 27))
    square = shapes_world.WorldObject("square", "green", (16, 0, 24, 8))
    detections = geneval_shapes.detect(shapes_world.render([small_red, big_blue, square]))
    prompts = {p["prompt"]: p for task in ("colors", "position", "counting") for p in shapes_world.task_prompts(task)}
    correct, reason = geneval_shapes.evaluate(detections, prompts["a photo of a red circle"])
    assert not correct and reason == "expected red circle>=1, found blue"
    assert geneval_shapes.evaluate(detections, prompts["a photo of a blue circle"]) == (True, "")
    assert geneval_shapes.evaluate(detections, prompts["a photo of a circle left of a square"])[0]
    # Only the smaller circle is below the square.
    assert not geneval_shapes.evaluate(detections, prompts["a photo of a circle below a square"])[0]
    assert geneval_shapes.evaluate(detections, prompts["a photo of two circles"]) == (True, "")
    assert not geneval_shapes.evaluate(detections, prompts["a photo of three circles"])[0]


def swapped_colors(spec: dict) -> dict:
    """The colours in the spec moved to ones the image does not show where it names them."""
    include = [dict(clause) for clause in spec["include"]]
    if spec["tag"] == "color_attr":
        include[0]["color"], include[1]["color"] = include[1]["color"], include[0]["color"]
    else:
        names = list(shapes_world.COLORS)
        include[0]["color"] = names[(names.index(include[0]["color"]) + 1) % len(names)]
    return {**spec, "include": include}


def swapped_relation(spec: dict) -> dict:
    target, placed = spec["include"]
    relation, group = placed["position"]
    return {**spec, "include": [target, {**placed, "position": [shapes_world.OPPOSITE_RELATIONS[relation], group]}]}


def test_score_is_zero_when_the_spec_contradicts_the_image(rendered):
    def score_changed(tasks, change):
        chosen = [e for e in rendered if e["task"] in tasks]
        images_NHWC, specs = as_arrays(chosen)
        return geneval_shapes.score(images_NHWC, [change(json.loads(spec)) for spec in specs])

    assert score_changed(("colors", "color_attr"), swapped_colors) == {"colors": 0.0, "color_attr": 0.0,
                                                                       "overall": 0.0}
    assert score_changed(("position",), swapped_relation) == {"position": 0.0, "overall": 0.0}

    def miscounted(spec):
        (clause,), n = spec["include"], spec["include"][0]["count"]
        return {**spec, "include": [{**clause, "count": n + 1}], "exclude": [{**clause, "count": n + 2}]}

    assert score_changed(("counting",), miscounted) == {"counting": 0.0, "overall": 0.0}


def test_score_errors_are_one_line_and_name_key_and_value(rendered):
    images_NHWC, specs = as_arrays(rendered[:6])
    for bad_NHWC, needle in ((images_NHWC[..., :2], "(6, 32, 32, 2)"), (images_NHWC.astype(np.float32), "float32"),
                             (images_NHWC[0], "(32, 32, 3)")):
        with pytest.raises(InputError) as excinfo:
            geneval_shapes.score(bad_NHWC, specs)
        assert_one_line_input_error(excinfo, "images_NHWC", needle, "uint8", "(N, 32, 32, 3)")
    with pytest.raises(InputError) as excinfo:
        geneval_shapes.detect(images_NHWC[0, :16])
    assert_one_line_input_error(excinfo, "image_HWC", "(16, 32, 3)", "(32, 32, 3)")
    with pytest.raises(InputError) as excinfo:
        geneval_shapes.score(images_NHWC, specs[:5])
    assert_one_line_input_error(excinfo, "specs has 5", "6 images")
    bad_specs = [({**json.loads(specs[0]), "tag": "spatial"}, ("spec['tag']='spatial'", "'position'")),
                 ({"tag": "colors", "include": [{"class": "star", "count": 1}]}, ("['class']='star'", "'circle'")),
                 ({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "orange"}]},
                  ("['color']='orange'", "'cyan'")),
                 ("{not json", ("spec='{not json'", "JSON"))]
    for spec, needles in bad_specs:
        with pytest.raises(InputError) as excinfo:
            geneval_shapes.score(images_NHWC[:1], [spec])
        assert_one_line_input_error(excinfo, *needles)
