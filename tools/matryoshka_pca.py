"""PCA initialisation of MatryoshkaKV (models/matryoshka_pca.py) from the training split, into
WORKDIR/matryoshka_kv.npz beside the checkpoint it was measured on.

  python tools/matryoshka_pca.py --config=configs/lm.py:tiny --workdir=workdirs/tiny [--num_tokens=65536]

The frozen model is the workdir's latest checkpoint, else config.init_from (hf:DIR, gguf:FILE), run uncompressed
(config.model.kv_rank and the per-head ranks are ignored here: the PCA basis serves every rank). Documents are
tokenized as the training pipeline does (EOS appended), concatenated and cut into config.data.seq_len windows
(the last one ragged) until --num_tokens. The file holds each softmax layer's key_skew, key_mean, value_skew,
value_mean (load with models.matryoshka_pca.load, merge with .merged) and each head's eigenvalues.
"""

import contextlib
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags

from checkpoints import init_from
from checkpoints.manager import Checkpoints
from configs import cli
from data import corpus, tokenizer as tokenizer_lib
from errors import InputError, checks
from models import matryoshka_pca, registry
from parallel import mesh as mesh_lib

NUM_TOKENS = flags.DEFINE_integer("num_tokens", 65_536, "Calibration tokens to measure the keys and values on.")
_BATCH_ROWS = 8
_ENCODE_BATCH = 1024  # documents per encode_batch call (tokenized in parallel on the Rust side)
_KV_FIELDS = ("kv_rank", "kv_key_ranks", "kv_value_ranks", "kv_bases")


def token_windows(documents, seq_len: int, batch_rows: int, num_tokens: int):
    """([batch_rows, seq_len] int32 tokens, [batch_rows] lengths) batches of the concatenated documents, at most
    num_tokens tokens in all; the last window may be short and the last batch's spare rows have length 0."""
    buffer, rows, total = [], [], 0
    for document in documents:
        document = list(document)[:num_tokens - total]
        total += len(document)
        buffer.extend(document)
        while len(buffer) >= seq_len:
            rows.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
            if len(rows) == batch_rows:
                yield _batch(rows, seq_len, batch_rows)
                rows = []
        if total >= num_tokens:
            break
    if buffer:
        rows.append(buffer)
    if rows:
        yield _batch(rows, seq_len, batch_rows)


def _batch(rows, seq_len, batch_rows):
    tokens_BT = np.zeros((batch_rows, seq_len), np.int32)
    lengths_B = np.zeros((batch_rows,), np.int32)
    for b, row in enumerate(rows):
        tokens_BT[b, :len(row)], lengths_B[b] = row, len(row)
    return tokens_BT, lengths_B


def calibration_batches(config, workdir: str, num_tokens: int, what: str = "MatryoshkaKV PCA"):
    """token_windows of config.data's train split, tokenized as the training pipeline does (the workdir's
    tokenizer, trained there if missing); an empty split is a one-line InputError saying `what` needs text."""
    checks.integer("--num_tokens", num_tokens, minimum=1)
    source = corpus.load_corpus(config.data)["train"]
    where = f"config.data.corpus={config.data.corpus!r}"
    if len(source) == 0:
        raise InputError(f"{where}: the train split has 0 documents; {what} needs calibration text "
                         "(a corpus with at least one non-empty document)")
    tokenizer = tokenizer_lib.load_or_train_tokenizer(config.data, workdir, source, config.model.vocab_size)
    eos = tokenizer_lib.eos_id(tokenizer)

    def documents():
        for start in range(0, len(source), _ENCODE_BATCH):
            texts = [corpus.record_text(source[i], config.data)
                     for i in range(start, min(start + _ENCODE_BATCH, len(source)))]
            for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
                yield encoding.ids + [eos]

    rows = min(_BATCH_ROWS, -(-num_tokens // config.data.seq_len))  # no all-padding rows for a short calibration
    return token_windows(documents(), config.data.seq_len, rows, num_tokens)


def calibrate(config, workdir: str, model, params, num_tokens: int, mesh=None, rules=()) -> dict:
    """Measures `model` (uncompressed) with `params` on config.data's train split and writes the file."""
    batches = calibration_batches(config, workdir, num_tokens)
    stats = matryoshka_pca.Moments.zeros(model.config)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(), nn.logical_axis_rules(rules):
        for tokens_BT, lengths_B in batches:
            stats = stats + matryoshka_pca.moments(model, params, tokens_BT, lengths_B)
    subtree = matryoshka_pca.pca_params(stats)  # one line if no token was measured
    path = os.path.join(workdir, "matryoshka_kv.npz")
    matryoshka_pca.save(path, subtree, stats)
    print(f"wrote {path}: key and value PCA bases of {len(subtree)} softmax layers from {stats.count:,} tokens")
    return {"path": path, "tokens": stats.count, "layers": len(subtree)}


def build(config, workdir: str, num_tokens: int) -> dict:
    """The workdir's latest checkpoint (or config.init_from) measured and PCA'd into WORKDIR/matryoshka_kv.npz."""
    checks.integer("--num_tokens", num_tokens, minimum=1)  # before the checkpoint is read
    config, init_checkpoint = init_from.resolve(config)
    model_fields = {key: value for key, value in config.model.items() if key not in _KV_FIELDS}
    model = registry.build(ml_collections.ConfigDict(model_fields))
    mesh = mesh_lib.make_mesh_for_present_devices(config.mesh)
    rules = mesh_lib.axis_rules(config)
    abstract_params, param_shardings = mesh_lib.sharded_abstract_params(model, mesh, rules)
    checkpoints = Checkpoints(workdir)
    step = checkpoints.latest_step()
    if step is None and init_checkpoint:
        params = init_from.load_params(init_checkpoint, config.model, param_shardings)
    else:
        params = checkpoints.restore_params(abstract_params, step)
    checkpoints.close()
    return calibrate(config, workdir, model, params, num_tokens, mesh, rules)


if __name__ == "__main__":
    cli.main(lambda: build(cli.CONFIG.value, cli.WORKDIR.value, NUM_TOKENS.value))
