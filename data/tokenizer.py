"""A run's tokenizer: a byte-level BPE trained on the train split, or a given file (a tokenizer.json, or the
tokenizer a GGUF checkpoint's metadata describes); either way WORKDIR/tokenizer.json holds the one the run uses."""

import os
import pathlib

import jax
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from checkpoints import gguf
from data.corpus import record_text
from errors import InputError

EOS = "<|endoftext|>"
# End-of-document tokens of common Hugging Face tokenizers, for a given tokenizer.json that lacks EOS.
_KNOWN_EOS = (EOS, "<|end_of_text|>", "</s>", "<eos>")
_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())


def load_or_train_tokenizer(data_config, workdir, train_source, vocab_size: int) -> tokenizers.Tokenizer:
    """config.data.tokenizer_path if given, else WORKDIR/tokenizer.json, else a BPE of vocab_size tokens (the
    model's vocabulary) trained on the train split; the workdir keeps a copy of what it uses."""
    tokenizer = existing_tokenizer(data_config, workdir, vocab_size)
    if tokenizer is None:
        tokenizer = train_tokenizer(data_config, train_source, vocab_size)
    path = pathlib.Path(workdir) / "tokenizer.json"
    if not path.exists() and jax.process_index() == 0:
        _save_atomically(tokenizer, path)
    return tokenizer


def existing_tokenizer(data_config, workdir, vocab_size: int) -> tokenizers.Tokenizer | None:
    """The tokenizer a run uses if it exists already (config.data.tokenizer_path, else WORKDIR/tokenizer.json),
    checked against the model's vocabulary and against the workdir's copy; None while it is still to be trained.
    Reads, never writes. workdir "": no workdir (a benchmark of a given checkpoint), only tokenizer_path."""
    path = pathlib.Path(workdir) / "tokenizer.json"
    kept = _load(path, "the workdir's tokenizer (delete it to retrain)") if workdir and path.exists() else None
    tokenizer = _load(data_config.tokenizer_path, "config.data.tokenizer_path") if data_config.tokenizer_path else kept
    if tokenizer is None:
        return None
    if kept is not None and kept.to_str() != tokenizer.to_str():
        raise InputError(f"config.data.tokenizer_path={data_config.tokenizer_path!r} is not the tokenizer this "
                         f"workdir's run used ({path}); use a fresh --workdir")
    if tokenizer.get_vocab_size() > vocab_size:
        raise InputError(f"config.model.vocab_size={vocab_size} is smaller than the {tokenizer.get_vocab_size()} "
                         f"tokens of the tokenizer {data_config.tokenizer_path or path}; raise it")
    return tokenizer


def train_tokenizer(data_config, train_source, vocab_size: int) -> tokenizers.Tokenizer:
    """Deterministic: the same source and config give the same tokenizer on every host."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_training_texts(data_config, train_source), trainer=trainer)
    return tokenizer


def eos_id(tokenizer: tokenizers.Tokenizer) -> int:
    """The document separator appended after every document."""
    for token in _KNOWN_EOS:
        if (token_id := tokenizer.token_to_id(token)) is not None:
            return token_id
    raise ValueError(f"tokenizer has none of the end-of-document tokens {_KNOWN_EOS}")


def bos_ids(tokenizer: tokenizers.Tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before every text (a Llama-style BOS); [] when it adds none."""
    encoding = tokenizer.encode("a", add_special_tokens=True)
    leading = next((i for i, special in enumerate(encoding.special_tokens_mask) if not special), len(encoding.ids))
    return encoding.ids[:leading]


def token_byte_lengths(tokenizer: tokenizers.Tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id adds to decoded text, for bits per byte; 0 for special tokens and unused ids."""
    lengths = np.zeros(vocab_size, np.int32)
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    for token_id in range(min(vocab_size, tokenizer.get_vocab_size())):
        if token_id in special:
            continue
        token = tokenizer.id_to_token(token_id)
        if set(token) <= _BYTE_ALPHABET:
            # Byte-level BPE spells each byte as one character; decoding a lone token could split a UTF-8 sequence.
            lengths[token_id] = len(token)
        else:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


def _training_texts(data_config, train_source):
    """Documents in source order (a fixed shuffle of files) until tokenizer_train_bytes."""
    budget = data_config.tokenizer_train_bytes
    for index in range(len(train_source)):
        if budget <= 0:
            return
        text = record_text(train_source[index], data_config)
        budget -= len(text.encode("utf-8"))
        yield text


def _load(path, what) -> tokenizers.Tokenizer:
    if str(path).endswith(".gguf"):
        tokenizer = gguf.tokenizer(str(path))  # rebuilt from the file's metadata; bad files are one-line errors
    else:
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # The Rust side raises a bare Exception for missing or malformed files.
            reason = "does not exist" if not os.path.exists(path) else f"is not a valid tokenizer.json ({error})"
            raise InputError(f"{what}: {path} {reason}".replace("\n", " ")) from None
    try:
        eos_id(tokenizer)
    except ValueError as error:
        raise InputError(f"{what}: {path}: {error}") from None
    return tokenizer


def _save_atomically(tokenizer, path: pathlib.Path):
    """Readers (other hosts, a concurrent evaluate.py) never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
