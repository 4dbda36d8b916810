"""Grain input pipelines: packed, shuffled, per-host training batches; fixed eval batches; code prompts.

Batches are {"tokens": np.int32 [local_batch, seq_len + 1]}, the language model's batch (inputs [:, :-1],
targets [:, 1:]). Documents are tokenized with EOS appended and concatenated, then cut into windows, so no token
is padding.
"""

import itertools
import re

import grain
import numpy as np

from data.corpus import record_text
from data.packing import PackedWindows
from data.tokenizer import eos_id
from errors import InputError

# A document is ~20 windows on average; grain's default buffer (500 documents) tokenizes far ahead of need, which
# delays the first batch and every restore.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)
_DEF_LINE = re.compile(r"^def .*$", re.MULTILINE)


class _TokenizeDocument(grain.transforms.Map):
    """Record -> int32 ids of its text followed by EOS."""

    def __init__(self, tokenizer, data_config):
        self._tokenizer = tokenizer
        self._eos = eos_id(tokenizer)
        self._data_config = data_config

    def map(self, record):
        ids = self._tokenizer.encode(record_text(record, self._data_config), add_special_tokens=False).ids
        ids.append(self._eos)
        return np.asarray(ids, np.int32)


def train_iterator(data_config, tokenizer, source, *, seed, process_index, process_count) -> grain.DatasetIterator:
    """Endless batches of this host's rows of the global batch, reshuffled every epoch; checkpointable.

    The documents are dealt into `config.data.num_shards` disjoint streams (default: one per host), each packed
    and shuffled on its own; global batch rows [s*r, (s+1)*r) come from stream s. Each host reads only its own
    streams, and a fixed num_shards makes the global batches the same for any number of hosts that divides it.
    """
    num_shards = data_config.num_shards or process_count
    if num_shards % process_count or data_config.global_batch_size % num_shards:
        raise InputError(f"config.data.num_shards={num_shards} must be a multiple of the {process_count} processes "
                         f"and divide config.data.global_batch_size={data_config.global_batch_size}")
    local_batch_size(data_config, process_count)
    rows_per_shard = data_config.global_batch_size // num_shards
    shards_per_host = num_shards // process_count
    streams = [_shard_stream(data_config, tokenizer, source, seed, shard, num_shards, rows_per_shard)
               for shard in range(process_index * shards_per_host, (process_index + 1) * shards_per_host)]
    if len(streams) == 1:
        return iter(streams[0].map(_as_batch))
    return iter(grain.experimental.ZipIterDataset(streams).map(lambda rows: _as_batch(np.concatenate(rows))))


def _shard_stream(data_config, tokenizer, source, seed, shard, num_shards, rows) -> grain.IterDataset:
    documents = (grain.MapDataset.source(source)[shard::num_shards]
                 .shuffle(seed=seed)
                 .repeat()  # The shuffle is seeded with seed + epoch, so every epoch has its own order.
                 .map(_TokenizeDocument(tokenizer, data_config))
                 .to_iter_dataset(_READ_OPTIONS))
    if data_config.num_workers > 0:
        # Workers tokenize round-robin slices in order, so batches do not depend on num_workers.
        documents = documents.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
    # Packed windows are shuffled in groups so that batches mix many files rather than walking through a few.
    windows = grain.experimental.WindowShuffleIterDataset(
        PackedWindows(documents, data_config.seq_len + 1), window_size=data_config.shuffle_windows, seed=seed)
    return windows.batch(rows, drop_remainder=True)


def eval_batches(data_config, tokenizer, source, *, num_batches, process_index, process_count) -> list[np.ndarray]:
    """The first num_batches global batches of packed windows, in document order; this host's rows of each."""
    local_batch = local_batch_size(data_config, process_count)
    documents = grain.MapDataset.source(source).map(_TokenizeDocument(tokenizer, data_config))
    windows = PackedWindows(documents.to_iter_dataset(_READ_OPTIONS), data_config.seq_len + 1)
    batches = windows.batch(data_config.global_batch_size, drop_remainder=True)
    rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
    selected = [_as_batch(batch[rows]) for batch in itertools.islice(batches, num_batches)]
    if not selected:
        raise InputError(f"config.data.global_batch_size={data_config.global_batch_size}: the validation split has "
                         f"fewer than that many windows of config.data.seq_len+1={data_config.seq_len + 1} tokens")
    return selected


def _as_batch(tokens_BT1: np.ndarray) -> dict:
    return {"tokens": tokens_BT1}


def validation_prompts(data_config, source, num_prompts, prompt_chars) -> list[str]:
    """One prompt per validation document, in order: up to prompt_chars of text ending with its first `def ` line.

    Documents without one (plain text corpora) give their first prompt_chars characters.
    """
    prompts = []
    for index in range(len(source)):
        if len(prompts) == num_prompts:
            break
        text = record_text(source[index], data_config)
        match = _DEF_LINE.search(text)
        end = match.end() + 1 if match else prompt_chars
        start = max(0, end - prompt_chars)
        if start > 0 and text[start - 1] != "\n" and "\n" in text[start:end - 1]:
            start = text.index("\n", start, end - 1) + 1  # Start at a line boundary rather than mid-line.
        if text[start:end].strip():
            prompts.append(text[start:end])
    return prompts


def local_batch_size(data_config, process_count) -> int:
    """Rows of the global batch that each host feeds."""
    if data_config.global_batch_size % process_count:
        raise InputError(f"config.data.global_batch_size={data_config.global_batch_size} is not divisible by "
                         f"the {process_count} processes (hosts)")
    return data_config.global_batch_size // process_count

