"""A TFDS builder for the shapes world (data/shapes_world.py), written as array_record so it reads without TensorFlow.

Nothing is downloaded: every example is rendered from (seed, split, index). Splits train and validation draw the
seen prompts, test the held-out ones. Every (seed, split sizes, held-out fraction) gets its own builder config,
hence its own cache. Records keep generation order, so record i of a split is generate_split's example i:

  image    uint8 [32, 32, 3]
  caption  bytes, e.g. b"a photo of a red circle and a blue square"
  task     bytes, one of shapes_world.TASKS
  spec     bytes, the prompt as GenEval metadata in JSON (what metrics/geneval_shapes.py scores against)
  objects  bytes, the drawn objects as JSON [{"shape", "color", "box": [x1, y1, x2, y2]}]

  sources = shapes_dataset.load_splits(data_dir, shapes_dataset.world_config(num_train=20_000))
  arrays = shapes_dataset.split_arrays(sources["train"])  # {feature: numpy array over the split}
"""

import dataclasses
import hashlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data import shapes_world
from errors import checks


@dataclasses.dataclass(eq=False, kw_only=True)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """The seed, the size of each split and the fraction of each task's prompts held out for test (made by
    world_config, which holds the defaults)."""

    seed: int
    num_train: int
    num_validation: int
    num_test: int
    held_out_fraction: float


def world_config(*, seed=0, num_train=20_000, num_validation=1_000, num_test=1_000,
                 held_out_fraction=0.2) -> ShapesWorldConfig:
    """A checked config named `seed<seed>-<hash>` so that every definition caches under its own name."""
    seed = checks.integer("seed", seed, minimum=0)
    sizes = {key: checks.integer(key, value, minimum=1)
             for key, value in (("num_train", num_train), ("num_validation", num_validation), ("num_test", num_test))}
    held_out_fraction = checks.number("held_out_fraction", held_out_fraction, above=0, below=1)
    rule = repr((seed, sizes["num_train"], sizes["num_validation"], sizes["num_test"], held_out_fraction))
    digest = hashlib.sha256(rule.encode()).hexdigest()[:10]
    return ShapesWorldConfig(name=f"seed{seed}-{digest}", version=ShapesWorld.VERSION, description=rule, seed=seed,
                             held_out_fraction=held_out_fraction, **sizes)


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """Rendered shapes with GenEval-style captions; test holds prompts that train never shows."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Five shapes, six colours, GenEval's six tasks, held-out prompts in test."}
    # As in data/text_corpus.py: stating it avoids TFDS 4.9.10's `importlib_resources` lookup.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = shapes_world.IMAGE_SIZE
        return tfds.core.DatasetInfo(
            builder=self,
            description="32x32 images of flat shapes with GenEval-style prompts (data/shapes_world.py).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "task": tfds.features.Text(),
                "spec": tfds.features.Text(),
                "objects": tfds.features.Text(),
            }),
            # Record i stays example i, which depends only on (seed, split, i).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Rendered here: nothing to download.
        config = self.builder_config
        sizes = {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}
        return {split: self._generate_examples(split, size) for split, size in sizes.items()}

    def _generate_examples(self, split, num_examples):
        config = self.builder_config
        examples = shapes_world.generate_split(split, num_examples, config.seed, config.held_out_fraction)
        yield from enumerate(examples)


def load_splits(data_dir: str, config: ShapesWorldConfig) -> dict:
    """Builds the dataset under data_dir if needed; {split: random-access source of dicts of numpy values}."""
    builder = ShapesWorld(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.as_data_source()


def split_arrays(source) -> dict:
    """A whole split in memory under the features' names: "image" uint8 [N, 32, 32, 3], the others str [N]."""
    records = source.__getitems__(range(len(source)))
    arrays = {"image": np.stack([record["image"] for record in records])}
    for key in ("caption", "task", "spec", "objects"):
        arrays[key] = np.array([record[key].decode() for record in records])
    return arrays
