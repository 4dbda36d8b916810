"""GenEval's scoring (Ghosh et al. 2023, djghosh13/geneval) on the shapes world, exact where GenEval uses models.

GenEval detects objects with Mask2Former and names their colours with CLIP; here a detector reads them off the
pixels, which is exact on rendered images (data/shapes_world.py):
- foreground: pixels farther than FOREGROUND_DISTANCE from the background colour;
- objects: its 8-connected components of at least MIN_AREA pixels; bigger components count as more confident,
  which orders each shape's detections;
- colour: the palette colour nearest to the component's mean RGB;
- shape: the shape whose mask drawn in the component's bounding box has the highest IoU with the component.
A component is no object, as GenEval drops detections below its confidence threshold, when it is small (under
MIN_AREA), not shaped like any shape (best IoU under MIN_SHAPE_IOU) or not of one colour (under MIN_COLOR_PURITY of
its pixels nearest its colour): so a generated image of coloured noise holds no objects, rendered ones exactly theirs.
Then GenEval's own rules (evaluation/evaluate_images.py: evaluate): each include clause takes its shape's `count`
most confident detections, needs that many, and as many of them in its colour, and in its relation to every
detection of its target clause (GenEval's centre-offset rule, shapes_world.relative_position); an exclude clause
fails the image if `count` or more of its shape are detected. An image is correct if every clause holds, a task's
accuracy is the fraction of its images that are correct, and the overall score is the mean over tasks.
"""

import json

import numpy as np

from data import shapes_world
from errors import InputError, checks

# Halfway from the background to the palette, whose colours are all 255 from it.
FOREGROUND_DISTANCE = 128
MIN_AREA = 10  # below the smallest drawn object (a cross of side 6: 20 pixels)
MIN_SHAPE_IOU = 0.75  # rendered objects match their shape's template exactly (IoU 1)
MIN_COLOR_PURITY = 0.75
_PALETTE_CK = np.array(list(shapes_world.COLORS.values()), np.float64)
_IMAGE_SHAPE = (shapes_world.IMAGE_SIZE, shapes_world.IMAGE_SIZE, 3)


def connected_components(mask_HW: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels_HW, count): labels 1..count of mask_HW's 8-connected components, 0 off the mask, numbered in raster
    order of each component's first pixel, as scipy.ndimage.label with a 3x3 structure numbers them (scipy is only a
    test dependency)."""
    height, width = mask_HW.shape
    unlabelled = height * width  # above every pixel index, so it never wins a minimum
    labels_HW = np.where(mask_HW, np.arange(height * width).reshape(height, width), unlabelled)
    # Each pass spreads every component's smallest pixel index one step; it stops once nothing changes.
    while True:
        padded = np.pad(labels_HW, 1, constant_values=unlabelled)
        neighbourhood_HW = np.min([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)], axis=0)
        spread_HW = np.where(mask_HW, neighbourhood_HW, unlabelled)
        if np.array_equal(spread_HW, labels_HW):
            break
        labels_HW = spread_HW
    firsts, numbered_HW = np.unique(labels_HW, return_inverse=True)
    numbered_HW = numbered_HW.reshape(height, width) + 1
    if mask_HW.all():
        return numbered_HW, len(firsts)
    numbered_HW[~mask_HW] = 0  # the last unique value is `unlabelled`
    return numbered_HW, len(firsts) - 1


def detect(image_HWC: np.ndarray) -> dict[str, list[dict]]:
    """{shape: detections, most confident (largest) first}; a detection is {"color", "box", "area"}, box in pixel
    edges (x1, y1, x2, y2) as shapes_world draws it."""
    check_image("image_HWC", image_HWC)
    pixels_HWC = image_HWC.astype(np.int64)
    distance_HW = np.sqrt(((pixels_HWC - np.array(shapes_world.BACKGROUND_RGB)) ** 2).sum(-1))
    labels_HW, count = connected_components(distance_HW > FOREGROUND_DISTANCE)
    found = []
    for label in range(1, count + 1):
        component_HW = labels_HW == label
        area = int(component_HW.sum())
        if area < MIN_AREA:
            continue
        rows, cols = np.nonzero(component_HW)
        box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        pixels_NC = pixels_HWC[component_HW]
        color_index = _nearest_palette_entry(pixels_NC.mean(0))
        shape, iou = best_shape(component_HW[box[1]:box[3], box[0]:box[2]])
        purity = np.mean(_nearest_palette_entry(pixels_NC) == color_index)
        if iou < MIN_SHAPE_IOU or purity < MIN_COLOR_PURITY:
            continue
        found.append((area, label, shape, {"color": list(shapes_world.COLORS)[color_index], "box": box,
                                           "area": area}))
    detections = {}
    # Largest first; among equal areas, raster order, so the ordering is deterministic.
    for _, _, shape, detection in sorted(found, key=lambda item: (-item[0], item[1])):
        detections.setdefault(shape, []).append(detection)
    return detections


def _nearest_palette_entry(rgb_NC):
    return np.argmin(((np.asarray(rgb_NC, np.float64)[..., None, :] - _PALETTE_CK) ** 2).sum(-1), axis=-1)


def best_shape(crop_HW: np.ndarray) -> tuple[str, float]:
    """(shape, IoU): the shape whose mask at the crop's size overlaps the crop best; the first of SHAPES on ties."""
    height, width = crop_HW.shape
    ious = []
    for shape in shapes_world.SHAPES:
        template_HW = shapes_world.shape_mask(shape, height, width)
        ious.append((crop_HW & template_HW).sum() / (crop_HW | template_HW).sum())
    best = int(np.argmax(ious))
    return shapes_world.SHAPES[best], float(ious[best])


def classify_shape(crop_HW: np.ndarray) -> str:
    """The shape whose mask at the crop's size overlaps the crop best (IoU); the first of SHAPES on ties."""
    return best_shape(crop_HW)[0]


def evaluate(detections: dict, spec) -> tuple[bool, str]:
    """(correct, reason) of one image's detections against a prompt spec (dict or JSON), by GenEval's rules."""
    spec = check_spec(spec)
    correct, reasons, matched_groups = True, [], []
    for clause in spec["include"]:
        shape, count = clause["class"], clause["count"]
        found = detections.get(shape, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {shape}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colors = [detection["color"] for detection in found]
                if colors.count(clause["color"]) < count:
                    matched = False
                    reasons.append(f"expected {clause['color']} {shape}>={count}, found {', '.join(colors)}")
            if "position" in clause and matched:
                relation, target = clause["position"]
                if matched_groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {shape} to be {relation}")
                else:
                    for obj in found:
                        for target_obj in matched_groups[target]:
                            relations = shapes_world.relative_position(obj["box"], target_obj["box"])
                            if relation not in relations:
                                matched = False
                                reasons.append(f"expected {shape} {relation} target, found "
                                               f"{' and '.join(sorted(relations)) or 'no relation to'} target")
                                break
                        if not matched:
                            break
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for clause in spec["exclude"]:
        shape, count = clause["class"], clause["count"]
        if len(detections.get(shape, [])) >= count:
            correct = False
            reasons.append(f"expected {shape}<{count}, found {len(detections[shape])}")
    return correct, "; ".join(reasons)


def score(images_NHWC: np.ndarray, specs) -> dict:
    """{task: accuracy} over the tasks present and "overall": their mean, GenEval's overall score."""
    if (not isinstance(images_NHWC, np.ndarray) or images_NHWC.shape[1:] != _IMAGE_SHAPE
            or images_NHWC.dtype != np.uint8):
        raise InputError(f"images_NHWC with shape {np.shape(images_NHWC)} and dtype "
                         f"{getattr(images_NHWC, 'dtype', None)} must be a uint8 numpy array of shape "
                         f"(N, {', '.join(map(str, _IMAGE_SHAPE))})")
    if len(specs) != len(images_NHWC):
        raise InputError(f"specs has {len(specs)} entries but images_NHWC has {len(images_NHWC)} images "
                         "(give one spec per image)")
    outcomes = {}
    for image_HWC, spec in zip(images_NHWC, specs):
        spec = check_spec(spec)
        correct, _ = evaluate(detect(image_HWC), spec)
        outcomes.setdefault(spec["tag"], []).append(correct)
    tasks = [task for task in shapes_world.TASKS if task in outcomes]
    result = {task: float(np.mean(outcomes[task])) for task in tasks}
    result["overall"] = float(np.mean([result[task] for task in tasks])) if tasks else float("nan")
    return result


def check_image(key: str, image_HWC) -> None:
    if not isinstance(image_HWC, np.ndarray) or image_HWC.shape != _IMAGE_SHAPE or image_HWC.dtype != np.uint8:
        raise InputError(f"{key} with shape {np.shape(image_HWC)} and dtype {getattr(image_HWC, 'dtype', None)} "
                         f"must be a uint8 numpy array of shape {_IMAGE_SHAPE}")


def check_spec(spec) -> dict:
    """The spec as a dict (parsed from JSON if given as str or bytes), its tag, classes, colours and relations
    checked against the world's."""
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as error:
            raise InputError(f"spec={spec!r} is not JSON ({error}); give GenEval metadata as a dict or JSON") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("include"), list):
        raise InputError(f"spec={spec!r} must be GenEval metadata: a dict with 'tag', 'include' and 'exclude' lists")
    spec = {**spec, "exclude": spec.get("exclude", [])}
    checks.choice("spec['tag']", spec.get("tag"), shapes_world.TASKS)
    for where, clauses in (("include", spec["include"]), ("exclude", spec["exclude"])):
        for index, clause in enumerate(clauses):
            key = f"spec['{where}'][{index}]"
            checks.choice(f"{key}['class']", clause.get("class"), shapes_world.SHAPES)
            checks.integer(f"{key}['count']", clause.get("count"), minimum=1)
            if "color" in clause:
                checks.choice(f"{key}['color']", clause["color"], tuple(shapes_world.COLORS))
            if "position" in clause:
                # The target is an earlier include clause, whose detections are matched first.
                relation, target = clause["position"]
                checks.choice(f"{key}['position'][0]", relation, shapes_world.RELATIONS)
                checks.integer(f"{key}['position'][1]", target, minimum=0, maximum=index - 1)
    return spec
