"""A TFDS builder for a local directory of text files, written as array_record so it reads without TensorFlow.

Each file is one document with features `text` and `path` (relative to the root). Files go to `train` or
`validation` by a stable hash of their relative path, so adding or removing other files never moves a file
between splits. Every (root, glob, max_files, split rule) gets its own builder config, hence its own cache.
"""

import dataclasses
import hashlib
import pathlib

import tensorflow_datasets as tfds
from etils import epath

# Installed packages and bytecode caches live under the stdlib directory but are not the standard library.
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


@dataclasses.dataclass(eq=False, kw_only=True)
class TextCorpusConfig(tfds.core.BuilderConfig):
    """Where the documents come from and how files are split."""

    root: str = ""
    file_glob: str = "**/*.py"
    max_files: int = 0
    validation_fraction: float = 0.05
    excluded_dirs: tuple[str, ...] = ()


def corpus_config(root, file_glob, max_files, validation_fraction, excluded_dirs=()) -> TextCorpusConfig:
    """A config named `<dir>-<hash>` so that every corpus definition caches under its own name."""
    root = str(pathlib.Path(root).resolve())
    rule = repr((root, file_glob, int(max_files), float(validation_fraction), tuple(excluded_dirs)))
    digest = hashlib.sha256(rule.encode()).hexdigest()[:10]
    label = "".join(c if c.isalnum() else "_" for c in pathlib.Path(root).name.lower()) or "root"
    return TextCorpusConfig(
        name=f"{label}-{digest}", version=TextCorpus.VERSION, description=rule, root=root,
        file_glob=file_glob, max_files=int(max_files), validation_fraction=float(validation_fraction),
        excluded_dirs=tuple(excluded_dirs))


def list_documents(config: TextCorpusConfig) -> list[str]:
    """Relative paths of the non-empty files matching the glob, sorted, cut to max_files."""
    root = pathlib.Path(config.root)
    paths = []
    for path in root.glob(config.file_glob):
        relative = path.relative_to(root)
        if any(part in config.excluded_dirs for part in relative.parts[:-1]):
            continue
        # Empty files (many __init__.py) would add documents made of a lone separator token.
        if path.is_file() and path.stat().st_size > 0:
            paths.append(relative.as_posix())
    paths.sort()
    return paths[:config.max_files] if config.max_files > 0 else paths


def is_validation(relative_path: str, validation_fraction: float) -> bool:
    """Stable across runs, machines and Python versions, unlike hash()."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def split_documents(config: TextCorpusConfig) -> dict[str, list[str]]:
    """The relative paths of each split."""
    splits = {"train": [], "validation": []}
    for relative in list_documents(config):
        splits["validation" if is_validation(relative, config.validation_fraction) else "train"].append(relative)
    return splits


class TextCorpus(tfds.core.GeneratorBasedBuilder):
    """Text files under a local directory, one document per file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Files split into train and validation by a hash of their relative path."}
    # TFDS 4.9.10 derives this for builders inside packages via the `importlib_resources` backport, which it only
    # installs on Python < 3.9; stating it avoids that import.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files, one document per file.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only: nothing to download.
        return {split: self._generate_examples(paths) for split, paths in split_documents(self.builder_config).items()}

    def _generate_examples(self, relative_paths):
        root = pathlib.Path(self.builder_config.root)
        for relative in relative_paths:
            # A few stdlib test files are deliberately not UTF-8; replacing keeps them as documents.
            text = (root / relative).read_bytes().decode("utf-8", errors="replace")
            yield relative, {"text": text, "path": relative}
