"""The data package: TFDS text corpus without TensorFlow, BPE tokenizer, grain pipelines and their checkpoints."""

import pathlib
import re
import sys

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from absl import flags

from data import corpus, pipeline, text_corpus, tokenizer
from errors import InputError

NUM_FILES = 16
VOCAB = 300  # the model's vocabulary, which sizes the trained tokenizer
MARKER = re.compile(r"marker_(\d+)_end")


def make_data_config(**overrides) -> ml_collections.ConfigDict:
    """The keys and defaults of configs/lm.py's config.data, sized down for tests."""
    config = ml_collections.ConfigDict(dict(
        corpus="stdlib", file_glob="**/*.py", max_files=0, validation_fraction=0.25, text_key="text",
        train_split="train", validation_split="validation", tfds_data_dir="", tokenizer_path="",
        tokenizer_train_bytes=20_000_000, seq_len=32, global_batch_size=4, shuffle_seed=0, shuffle_windows=1024,
        num_shards=0,
        num_workers=0))
    config.update(overrides)
    return config


def write_code_corpus(root: pathlib.Path, num_files: int = NUM_FILES):
    """Small Python files; each names its own index in markers, so windows can be traced back to files."""
    for i in range(num_files):
        path = root / f"pkg{i % 3}" / f"module_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        functions = "".join(f'\n\ndef function_{i}_{j}(x):\n    """Scales x (marker_{i}_end)."""\n    return x * {j}\n'
                            for j in range(4))
        path.write_text(f'"""Module {i}: résumé of marker_{i}_end."""\nimport math\n{functions}')
    (root / "notes.txt").write_text("not python\n")
    (root / "pkg0" / "__init__.py").write_text("")


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    write_code_corpus(root)
    return root


@pytest.fixture(scope="module")
def data_config(code_dir, tmp_path_factory):
    return make_data_config(corpus=str(code_dir), tfds_data_dir=str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def sources(data_config):
    return corpus.load_corpus(data_config)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("workdir")


@pytest.fixture(scope="module")
def bpe(data_config, sources, workdir):
    return tokenizer.load_or_train_tokenizer(data_config, workdir, sources["train"], VOCAB)


def file_markers(batches, bpe) -> set[int]:
    return {int(m) for batch in batches for row in batch for m in MARKER.findall(bpe.decode(row.tolist()))}


def assert_one_line_input_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


# Corpus.

def test_builder_writes_array_record_and_reads_by_random_access(data_config, sources, code_dir):
    written = list(pathlib.Path(data_config.tfds_data_dir).glob("text_corpus/*/1.0.0/*.array_record-*"))
    assert {p.name.split(".")[0] for p in written} == {"text_corpus-train", "text_corpus-validation"}
    assert len(sources["train"]) + len(sources["validation"]) == NUM_FILES
    for split, source in sources.items():
        for index in reversed(range(len(source))):
            record = source[index]
            path = record["path"].decode()
            assert (code_dir / path).read_text() == corpus.record_text(record, data_config)
            assert text_corpus.is_validation(path, data_config.validation_fraction) == (split == "validation")
    assert "tensorflow" not in sys.modules


def test_split_is_deterministic_disjoint_and_stable_by_file(data_config, sources, code_dir, tmp_path):
    config = text_corpus.corpus_config(code_dir, data_config.file_glob, 0, data_config.validation_fraction)
    splits = text_corpus.split_documents(config)
    assert splits == text_corpus.split_documents(config)
    assert not set(splits["train"]) & set(splits["validation"])
    assert len(splits["train"]) + len(splits["validation"]) == NUM_FILES  # Empty and non-.py files are left out.
    assert {sources["train"][i]["path"].decode() for i in range(len(sources["train"]))} == set(splits["train"])
    # A larger corpus keeps every existing file in its split.
    bigger = tmp_path / "bigger"
    write_code_corpus(bigger, 2 * NUM_FILES)
    bigger_config = text_corpus.corpus_config(bigger, data_config.file_glob, 0, data_config.validation_fraction)
    bigger_splits = text_corpus.split_documents(bigger_config)
    for split, paths in splits.items():
        assert set(paths) <= set(bigger_splits[split])
    assert bigger_config.name != config.name


def test_stdlib_corpus_with_max_files(tmp_path):
    config = make_data_config(max_files=40, tfds_data_dir=str(tmp_path))
    sources = corpus.load_corpus(config)
    paths = [source[i]["path"].decode() for source in sources.values() for i in range(len(source))]
    assert len(paths) == 40 and all(p.endswith(".py") for p in paths)
    assert not any("site-packages" in p or "__pycache__" in p for p in paths)


@pytest.mark.parametrize("case", ["missing", "empty", "no_match", "no_validation_files"])
def test_corpus_errors_are_one_line_and_name_key_and_path(case, tmp_path, code_dir):
    root, overrides = tmp_path / "corpus", {}
    if case == "empty":
        root.mkdir()
    elif case == "no_match":
        root = code_dir
        overrides = {"file_glob": "**/*.rs"}
    elif case == "no_validation_files":
        root = code_dir
        overrides = {"validation_fraction": 0.0}
    config = make_data_config(corpus=str(root), tfds_data_dir=str(tmp_path / "tfds"), **overrides)
    with pytest.raises(InputError) as excinfo:
        corpus.load_corpus(config)
    assert_one_line_input_error(excinfo, "config.data.corpus", str(root), *overrides)


class TinyLines(tfds.core.GeneratorBasedBuilder):
    """A registered TFDS dataset with a text field that is not named `text`."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"line": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

    def _generate_examples(self, count):
        for i in range(count):
            yield i, {"line": f"line {i} of {count}"}


def test_tfds_named_corpus(tmp_path):
    TinyLines(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = make_data_config(corpus="tfds:tiny_lines", tfds_data_dir=str(tmp_path), text_key="line",
                              validation_split="test")
    sources = corpus.load_corpus(config)
    assert len(sources["train"]) == 6
    assert sorted(corpus.record_text(sources["validation"][i], config) for i in range(2)) == [
        "line 0 of 2", "line 1 of 2"]
    config.validation_split = "validation"
    with pytest.raises(InputError) as excinfo:
        corpus.load_corpus(config)
    assert_one_line_input_error(excinfo, "config.data.validation_split")
    config.corpus = "tfds:no_such_dataset_anywhere"
    with pytest.raises(InputError) as excinfo:
        corpus.load_corpus(config)
    assert_one_line_input_error(excinfo, "config.data.corpus", "no_such_dataset_anywhere")


# Tokenizer.

def test_tokenizer_is_trained_saved_reloaded_and_round_trips(data_config, sources, workdir, bpe, tmp_path):
    assert (workdir / "tokenizer.json").exists()
    assert tokenizer.eos_id(bpe) == 0
    reloaded = tokenizer.load_or_train_tokenizer(data_config, workdir, sources["train"], VOCAB)
    assert reloaded.to_str() == bpe.to_str()
    retrained = tokenizer.load_or_train_tokenizer(data_config, tmp_path, sources["train"], VOCAB)
    assert retrained.to_str() == bpe.to_str()  # Deterministic, so every host may train its own.
    text = 'def f(x):\n    return "naïve 東京 ✓" + x  # marker_3_end\n'
    ids = bpe.encode(text).ids
    assert bpe.decode(ids) == text
    lengths = tokenizer.token_byte_lengths(bpe, VOCAB + 10)
    assert lengths.dtype == np.int32 and lengths[0] == 0 and not lengths[bpe.get_vocab_size():].any()
    assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_given_tokenizer_path(data_config, sources, workdir, bpe, tmp_path):  # bpe: the workdir's tokenizer
    given = make_data_config(tokenizer_path=str(workdir / "tokenizer.json"))
    assert tokenizer.load_or_train_tokenizer(given, tmp_path, sources["train"], VOCAB).get_vocab_size() == 300
    assert (tmp_path / "tokenizer.json").read_text() == (workdir / "tokenizer.json").read_text()  # the run's copy
    (tmp_path / "broken.json").write_text("{not json")
    for path in [tmp_path / "missing.json", tmp_path / "broken.json"]:
        with pytest.raises(InputError) as excinfo:
            tokenizer.load_or_train_tokenizer(make_data_config(tokenizer_path=str(path)), tmp_path, sources["train"],
                                            VOCAB)
        assert_one_line_input_error(excinfo, "config.data.tokenizer_path", str(path))
    with pytest.raises(InputError) as excinfo:
        tokenizer.load_or_train_tokenizer(given, tmp_path / "other", sources["train"], 256)
    assert_one_line_input_error(excinfo, "config.model.vocab_size=256", "300 tokens")
    assert not (tmp_path / "other").exists()


# Pipeline.

def take(iterator, count):
    return [next(iterator)["tokens"] for _ in range(count)]


def make_train_iterator(data_config, bpe, sources, seed=0, process_index=0, process_count=1):
    return pipeline.train_iterator(data_config, bpe, sources["train"], seed=seed, process_index=process_index,
                                   process_count=process_count)


def test_train_batches_are_packed_windows_with_eos(data_config, sources, bpe):
    batches = take(make_train_iterator(data_config, bpe, sources), 30)
    for batch in batches:
        assert batch.shape == (4, 33) and batch.dtype == np.int32
    assert (np.stack(batches) == tokenizer.eos_id(bpe)).any()


def test_hosts_get_disjoint_halves(data_config, sources, bpe):
    host_markers = []
    for process_index in range(2):
        batches = take(make_train_iterator(data_config, bpe, sources, process_index=process_index, process_count=2), 40)
        assert all(batch.shape == (2, 33) for batch in batches)
        host_markers.append(file_markers(batches, bpe))
    train_markers = {int(MARKER.search(corpus.record_text(sources["train"][i], data_config)).group(1))
                     for i in range(len(sources["train"]))}
    assert not host_markers[0] & host_markers[1]
    assert host_markers[0] | host_markers[1] == train_markers
    with pytest.raises(InputError) as excinfo:
        make_train_iterator(data_config, bpe, sources, process_count=3)
    assert_one_line_input_error(excinfo, "config.data.global_batch_size")


def test_fixed_shard_count_gives_the_same_global_batches_for_any_host_count(data_config, sources, bpe, tmp_path):
    data_config = ml_collections.ConfigDict({**data_config.to_dict(), "num_shards": 2})
    one_host = take(make_train_iterator(data_config, bpe, sources, process_count=1), 12)
    halves = [take(make_train_iterator(data_config, bpe, sources, process_index=i, process_count=2), 12)
              for i in range(2)]
    np.testing.assert_array_equal(np.stack(one_host), np.concatenate([np.stack(h) for h in halves], axis=1))

    # Two zipped streams on one host checkpoint and restore exactly too.
    iterator = make_train_iterator(data_config, bpe, sources)
    take(iterator, 5)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("data",))
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = np.stack(take(iterator, 20))
    restored = make_train_iterator(data_config, bpe, sources)
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    np.testing.assert_array_equal(np.stack(take(restored, 20)), expected)
    manager.close()
    with pytest.raises(InputError) as excinfo:
        make_train_iterator(data_config, bpe, sources, process_count=4)
    assert_one_line_input_error(excinfo, "config.data.num_shards")


def test_shuffle_follows_seed(data_config, sources, bpe):
    first = take(make_train_iterator(data_config, bpe, sources, seed=1), 8)
    again = take(make_train_iterator(data_config, bpe, sources, seed=1), 8)
    other = take(make_train_iterator(data_config, bpe, sources, seed=2), 8)
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other))


def test_restored_iterator_continues_exactly(data_config, sources, bpe, tmp_path):
    uninterrupted = make_train_iterator(data_config, bpe, sources)
    take(uninterrupted, 7)
    state = uninterrupted.get_state()
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("data",))
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(uninterrupted)))
    manager.wait_until_finished()
    expected = np.stack(take(uninterrupted, 60))  # Crosses epochs of the tiny corpus.

    from_state = make_train_iterator(data_config, bpe, sources)
    from_state.set_state(state)
    np.testing.assert_array_equal(np.stack(take(from_state, 60)), expected)
    from_orbax = make_train_iterator(data_config, bpe, sources)
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(from_orbax)))
    np.testing.assert_array_equal(np.stack(take(from_orbax, 60)), expected)
    manager.close()


def test_eval_batches_are_fixed_and_split_by_rows_across_hosts(data_config, sources, bpe):
    def batches(process_index, process_count):
        return [batch["tokens"] for batch in pipeline.eval_batches(
            data_config, bpe, sources["validation"], num_batches=2, process_index=process_index,
            process_count=process_count)]

    whole = batches(0, 1)
    assert len(whole) == 2 and all(batch.shape == (4, 33) and batch.dtype == np.int32 for batch in whole)
    # Windows are the documents, each followed by EOS, concatenated in order without padding.
    validation = sources["validation"]
    stream = np.concatenate([bpe.encode(corpus.record_text(validation[i], data_config)).ids + [tokenizer.eos_id(bpe)]
                             for i in range(len(validation))])
    np.testing.assert_array_equal(np.concatenate(whole).ravel(), stream[:2 * 4 * 33])
    np.testing.assert_array_equal(np.stack(whole), np.stack(batches(0, 1)))
    halves = [batches(0, 2), batches(1, 2)]
    for i, batch in enumerate(whole):
        np.testing.assert_array_equal(batch, np.concatenate([halves[0][i], halves[1][i]]))


def test_validation_prompts_end_with_a_def_line(data_config, sources):
    prompts = pipeline.validation_prompts(data_config, sources["validation"], num_prompts=3, prompt_chars=80)
    assert len(prompts) == 3 and prompts == pipeline.validation_prompts(data_config, sources["validation"], 3, 80)
    for prompt in prompts:
        assert len(prompt) <= 80
        assert prompt.endswith("\n") and prompt.splitlines()[-1].startswith("def function_")


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(data_config, sources, bpe):
    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, which train.py parses and pytest does not.
    in_process = take(make_train_iterator(data_config, bpe, sources), 10)
    with_workers = make_data_config(**{**data_config.to_dict(), "num_workers": 2})
    np.testing.assert_array_equal(np.stack(take(make_train_iterator(with_workers, bpe, sources), 10)),
                                  np.stack(in_process))
