"""Resolve `config.data.corpus` to random-access train and validation sources (TFDS array_record, no TensorFlow)."""

import os
import pathlib
import sysconfig

import tensorflow_datasets as tfds

from data import shapes_dataset, text_corpus
from errors import InputError

SPLITS = ("train", "validation")
SHAPES_WORLD = "shapes_world"  # the rendered images with captions of data/shapes_dataset.py, sized by config.data.world
_TFDS_PREFIX = "tfds:"


def load_corpus(data_config) -> dict:
    """Builds the corpus if needed and returns {"train": source, "validation": source} (and "test" for the shapes
    world: its held-out prompts)."""
    if data_config.corpus == SHAPES_WORLD:
        return _load_shapes_world(data_config)
    if data_config.corpus.startswith(_TFDS_PREFIX):
        return _load_tfds(data_config)
    return _load_directory(data_config)


def record_text(record, data_config) -> str:
    """The text of one record of a source returned by load_corpus."""
    keyed = data_config.corpus.startswith(_TFDS_PREFIX) or data_config.corpus == SHAPES_WORLD
    key = data_config.text_key if keyed else "text"
    text = record[key]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def _data_dir(data_config) -> str | None:
    return data_config.tfds_data_dir or None


def _load_directory(data_config) -> dict:
    if data_config.corpus == "stdlib":
        root, excluded = sysconfig.get_paths()["stdlib"], text_corpus.STDLIB_EXCLUDED_DIRS
    else:
        root, excluded = os.path.expanduser(data_config.corpus), ()
    where = f"config.data.corpus={data_config.corpus!r}"
    if not pathlib.Path(root).is_dir():
        raise InputError(f"{where}: directory {root} does not exist (give a directory of text files, "
                         "'stdlib' or 'tfds:NAME')")
    config = text_corpus.corpus_config(root, data_config.file_glob, data_config.max_files,
                                       data_config.validation_fraction, excluded)
    splits = text_corpus.split_documents(config)
    num_files = sum(len(paths) for paths in splits.values())
    if num_files == 0:
        raise InputError(f"{where}: directory {root} has no non-empty files matching "
                         f"config.data.file_glob={data_config.file_glob!r}")
    for split, paths in splits.items():
        if not paths:
            raise InputError(
                f"{where}: the {split} split of {root} has 0 of {num_files} files with "
                f"config.data.validation_fraction={data_config.validation_fraction} (change it or add files)")
    builder = text_corpus.TextCorpus(config=config, data_dir=_data_dir(data_config), file_format="array_record")
    builder.download_and_prepare()
    return builder.as_data_source()


def _load_shapes_world(data_config) -> dict:
    try:
        world = shapes_dataset.world_config(**data_config.world)
    except InputError as error:
        raise InputError(f"config.data.world.{error}") from None
    except TypeError as error:
        raise InputError(f"config.data.world={dict(data_config.world)}: {error}") from None
    return shapes_dataset.load_splits(_data_dir(data_config), world)


def _load_tfds(data_config) -> dict:
    name = data_config.corpus[len(_TFDS_PREFIX):]
    where = f"config.data.corpus={data_config.corpus!r}"
    try:
        builder = tfds.builder(name, data_dir=_data_dir(data_config))
    except tfds.core.registered.DatasetNotFoundError:
        raise InputError(f"{where}: no TFDS dataset named {name!r} is registered or built under "
                         f"{data_config.tfds_data_dir or 'the TFDS default data dir'}") from None
    if not builder.is_prepared():
        # Preparing most TFDS datasets downloads data and needs TensorFlow; runs stay offline, so it is a setup step.
        raise InputError(f"{where}: dataset is not built under {builder.data_dir}; build it once with "
                         f"`tfds build {name} --file_format=array_record --data_dir=...`")
    splits = {"train": data_config.train_split, "validation": data_config.validation_split}
    for key, split in splits.items():
        if split not in builder.info.splits:
            raise InputError(f"config.data.{key}_split={split!r}: {name} has splits {sorted(builder.info.splits)}")
    try:
        return {key: builder.as_data_source(split=split) for key, split in splits.items()}
    except NotImplementedError:
        raise InputError(f"{where}: {builder.data_dir} is not in array_record format, which random access needs; "
                         f"rebuild it with `tfds build {name} --file_format=array_record`") from None
