"""Builds the n-gram store that Superposed Decoding interpolates with, from the training split, into WORKDIR/ngrams.npz.

  python tools/build_ngrams.py --config=configs/lm.py:tiny --workdir=workdirs/tiny

Uses the workdir's tokenizer (trained and saved there first if missing, as train.py does). Documents are tokenized
as the training pipeline does (EOS appended), counted per document, and the build time and file size are printed.
"""

import os

import numpy as np

from checkpoints import init_from
from configs import cli
from data import corpus, tokenizer as tokenizer_lib
from samplers import ngram_store

_ENCODE_BATCH = 1024  # documents per encode_batch call (tokenized in parallel on the Rust side)


def build(config, workdir: str) -> dict:
    config, _ = init_from.resolve(config)  # an imported model brings its tokenizer
    source = corpus.load_corpus(config.data)["train"]
    tokenizer = tokenizer_lib.load_or_train_tokenizer(config.data, workdir, source, config.model.vocab_size)
    eos = tokenizer_lib.eos_id(tokenizer)

    def documents():
        for start in range(0, len(source), _ENCODE_BATCH):
            texts = [corpus.record_text(source[i], config.data)
                     for i in range(start, min(start + _ENCODE_BATCH, len(source)))]
            for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
                yield np.asarray(encoding.ids + [eos], np.int32)

    info = ngram_store.build_and_save(documents(), os.path.join(workdir, "ngrams.npz"),
                                      vocab_size=tokenizer.get_vocab_size())
    rows = ", ".join(f"{n}-grams {r:,}" for n, r in info["rows_per_order"].items())
    print(f"built {info['path']} from {info['num_tokens']:,} tokens in {info['build_seconds']:.1f} s "
          f"(tokenizing included); {info['file_bytes'] / 2**20:.1f} MiB on disk; {rows}")
    return info


if __name__ == "__main__":
    cli.main(lambda: build(cli.CONFIG.value, cli.WORKDIR.value))
