"""Jacobi trajectories (CLLM's training data) as an array_record dataset, and the batches consistency training reads.

A record is one block of a Jacobi decoding run of the base model (tools/jacobi_trajectories.py writes them):
  context      the tokens before the block: the prompt and the blocks before it
  states       the J >= 1 window states the iteration went through before reaching the fixed point, [J, W]
  fixed_point  the fixed point, [W]: greedy decoding's W tokens after the context
  valid        the fixed point's tokens up to and including its first stop token (W if none); the ones after it
               are not trained on (CLLM pads them)
stored as one int32 array [len(context), J, W, valid, context..., states..., fixed_point...].

A directory holds shards `trajectories-NNNNN.array_record` (each written whole, then renamed into place, so a
killed run leaves no partial shard) and, once every shard is written, `dataset_info.json` with the sizes and times.

Training batches (`train_iterator`): rows of config.data.seq_len + 1 tokens,
  tokens        context ⊕ fixed point, right-padded with 0 (the context left-cut to fit)
  states        [W, W]: the record's states, then copies of the fixed point (never drawn)
  num_states    J; the loss draws one of the first J states per row (CLLM: a random state of the trajectory)
  window_start  index in tokens of the block's first token
  valid         as above
"""

import glob
import json
import os

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data.pipeline import local_batch_size
from errors import InputError

SHARD_PATTERN = "trajectories-{:05d}.array_record"
INFO_FILE = "dataset_info.json"
_HEADER = 4


def encode(context, states_JW, fixed_point_W, valid: int) -> bytes:
    states_JW = np.asarray(states_JW, np.int32)
    J, W = states_JW.shape
    header = np.array([len(context), J, W, valid], np.int32)
    return np.concatenate([header, np.asarray(context, np.int32), states_JW.reshape(-1),
                           np.asarray(fixed_point_W, np.int32)]).tobytes()


def decode(record: bytes) -> dict:
    values = np.frombuffer(record, np.int32)
    context_length, J, W, valid = (int(v) for v in values[:_HEADER])
    states_start = _HEADER + context_length
    fixed_start = states_start + J * W
    return {"context": values[_HEADER:states_start], "states": values[states_start:fixed_start].reshape(J, W),
            "fixed_point": values[fixed_start:fixed_start + W], "valid": valid}


def write_shard(directory: str, index: int, records: list[bytes]) -> str:
    """Writes one shard under a temporary name and renames it into place; returns its path."""
    path = os.path.join(directory, SHARD_PATTERN.format(index))
    writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    os.replace(path + ".tmp", path)
    return path


def shard_paths(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, SHARD_PATTERN.replace("{:05d}", "[0-9]" * 5))))


def info(directory: str) -> dict:
    """The dataset's dataset_info.json, or a one-line error saying how to make it."""
    path = os.path.join(directory, INFO_FILE)
    if not os.path.isfile(path):
        state = "is incomplete" if shard_paths(directory) else "has no Jacobi trajectories"
        raise InputError(f"config.data.trajectories={directory!r} {state}; write them with "
                         f"python tools/jacobi_trajectories.py --config=CONFIG --workdir={directory}")
    with open(path) as file:
        return json.load(file)


class _Layout(grain.transforms.Map):
    """A record -> one training row (the fields above)."""

    def __init__(self, seq_len: int):
        self._length = seq_len + 1

    def map(self, record):
        example = decode(record)
        states_JW, fixed_point_W = example["states"], example["fixed_point"]
        J, W = states_JW.shape
        context = example["context"][-(self._length - W):]
        tokens = np.zeros(self._length, np.int32)
        tokens[:len(context)] = context
        tokens[len(context):len(context) + W] = fixed_point_W
        states_WW = np.broadcast_to(fixed_point_W, (W, W)).copy()
        states_WW[:J] = states_JW
        return {"tokens": tokens, "states": states_WW, "num_states": np.int32(J),
                "window_start": np.int32(len(context)), "valid": np.int32(example["valid"])}


def check(data_config) -> dict:
    """config.data.trajectories's info, once it is known to fit config.data.seq_len."""
    directory = data_config.trajectories
    dataset = info(directory)
    if dataset["window"] + 1 > data_config.seq_len:
        raise InputError(f"config.data.seq_len={data_config.seq_len} must exceed the trajectories' window "
                         f"{dataset['window']} (config.data.trajectories={directory!r}): a row holds context and"
                         " window")
    return dataset


def train_iterator(data_config, *, seed: int, process_index: int, process_count: int) -> grain.DatasetIterator:
    """Endless batches of this host's rows, the records reshuffled every epoch; checkpointable like the text
    pipeline's iterator. Each host reads its own records (every process_count-th)."""
    check(data_config)
    directory = data_config.trajectories
    local_batch = local_batch_size(data_config, process_count)
    source = grain.sources.ArrayRecordDataSource(shard_paths(directory))
    records = grain.MapDataset.source(source)[process_index::process_count]
    if len(records) < local_batch:
        raise InputError(f"config.data.global_batch_size={data_config.global_batch_size}: "
                         f"config.data.trajectories={directory!r} has only {len(source)} records")
    rows = records.shuffle(seed=seed).repeat().map(_Layout(data_config.seq_len))
    return iter(rows.batch(local_batch, drop_remainder=True).to_iter_dataset())
