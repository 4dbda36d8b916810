"""Batches of the shapes world (data/shapes_dataset.py, config.data.corpus = "shapes_world") for the image model
(models/image_ar.py): batch_format "shapes_images". A row is one example:

  text            int32 [L]: the caption's tokens (the run's tokenizer, data/tokenizer.py: a BPE trained on the
                  captions) and its end-of-text token, left-padded with that same token to L =
                  config.data.caption_tokens; at least one padding token leads, so the caption's first token is
                  predicted from a position
  caption_tokens  int32: the caption's tokens and its end (what the text loss counts)
  image           uint8 [32, 32, 3]

The end-of-text token doubles as padding and as the null caption's every token (classifier-free guidance): a
caption ends where the image begins, and padding carries no words. `prompt_tokens` is the same layout for the
sampler's prompts.
"""

import grain
import numpy as np

from data import shapes_world
from data.pipeline import local_batch_size
from data.tokenizer import eos_id
from errors import InputError

BATCH_FORMAT = "shapes_images"


def prompt_tokens(tokenizer, caption: str, length: int) -> tuple[np.ndarray, int]:
    """(int32 [length] text row, caption tokens counted) of a caption, as training rows lay it out."""
    end = eos_id(tokenizer)
    ids = tokenizer.encode(caption, add_special_tokens=False).ids + [end]
    if len(ids) >= length:
        raise InputError(f"config.data.caption_tokens={length} cannot hold the caption {caption!r}: it needs "
                         f"{len(ids) + 1} (its {len(ids) - 1} tokens, the end of text and one leading pad)")
    return np.asarray([end] * (length - len(ids)) + ids, np.int32), len(ids)


def without_captions(batch: dict) -> dict:
    """The batch with every caption replaced by the null caption (all padding: classifier-free guidance's
    unconditional rows); numpy or jax arrays."""
    text_BL = batch["text"]
    return dict(batch, text=text_BL[:, :1].repeat(text_BL.shape[1], axis=1), caption_tokens=0 * batch["caption_tokens"])


def check_captions_fit(tokenizer, length: int) -> None:
    """Every caption the world can make (seen and held-out prompts) fits `length`: a one-line error otherwise."""
    longest = max((p["prompt"] for task in shapes_world.TASKS for p in shapes_world.task_prompts(task)),
                  key=lambda caption: len(tokenizer.encode(caption, add_special_tokens=False).ids))
    prompt_tokens(tokenizer, longest, length)


class _Layout(grain.transforms.Map):
    def __init__(self, tokenizer, length: int):
        self._tokenizer, self._length = tokenizer, length

    def map(self, record):
        caption = record["caption"].decode() if isinstance(record["caption"], bytes) else str(record["caption"])
        text_L, count = prompt_tokens(self._tokenizer, caption, self._length)
        return {"text": text_L, "caption_tokens": np.int32(count), "image": np.asarray(record["image"], np.uint8)}


def train_iterator(data_config, tokenizer, source, *, seed: int, process_index: int,
                   process_count: int) -> grain.DatasetIterator:
    """Endless batches of this host's rows (every process_count-th example), reshuffled every epoch;
    checkpointable like the text pipeline's iterator."""
    check_captions_fit(tokenizer, data_config.caption_tokens)
    local_batch = local_batch_size(data_config, process_count)
    examples = grain.MapDataset.source(source)[process_index::process_count]
    if len(examples) < local_batch:
        raise InputError(f"config.data.global_batch_size={data_config.global_batch_size}: the shapes world's train "
                         f"split has only {len(source)} examples (config.data.world.num_train)")
    layout = _Layout(tokenizer, data_config.caption_tokens)
    batches = examples.shuffle(seed=seed).repeat().map(layout).batch(local_batch, drop_remainder=True)
    return iter(batches.to_iter_dataset())


def eval_batches(data_config, tokenizer, source, *, num_batches: int, process_index: int,
                 process_count: int) -> list[dict]:
    """The first num_batches global batches of the split, in order; this host's rows of each."""
    check_captions_fit(tokenizer, data_config.caption_tokens)
    local_batch, global_batch = local_batch_size(data_config, process_count), data_config.global_batch_size
    num_batches = min(num_batches, len(source) // global_batch)
    if not num_batches:
        raise InputError(f"config.data.global_batch_size={global_batch}: the shapes world's validation split has "
                         f"only {len(source)} examples (config.data.world.num_validation)")
    layout = _Layout(tokenizer, data_config.caption_tokens)
    batches = []
    for b in range(num_batches):
        first = b * global_batch + process_index * local_batch
        rows = [layout.map(source[index]) for index in range(first, first + local_batch)]
        batches.append({key: np.stack([row[key] for row in rows]) for key in rows[0]})
    return batches
