"""Validation loss of a GGUF model through decodelab and through transformers' GGUF loader, on the same batches.

  python benchmarks/gguf_validation.py --config=configs/smollm2.py --out=benchmarks/results/gguf_validation

The batches are evaluate.py's (config.data.seq_len, global_batch_size and evaluate.validation.num_batches windows of
the validation split), tokenized with the file's own tokenizer as decodelab rebuilds it. decodelab's numbers are the
validation evaluator's (evaluators/validation.py) on the model gguf.load builds; transformers' are the mean
cross-entropy of its model on the same int32 batches. Writes OUT/gguf_validation.json, with the largest logit
difference on the first batch.
"""

import argparse
import importlib.util
import json
import math
import os
import time

import jax
import numpy as np
import torch
import transformers

import evaluators
from checkpoints import gguf
from data import corpus
from parallel import mesh as mesh_lib


def transformers_loss(path: str, batches) -> tuple[float, np.ndarray]:
    """Mean next-token cross-entropy (nats) over the batches, and the first batch's logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=torch.float32).eval()
    nll, tokens, first_BTV = 0.0, 0, None
    with torch.no_grad():
        for tokens_BT1 in batches:
            tokens_BT1 = torch.from_numpy(tokens_BT1.astype(np.int64))
            logits_BTV = model(tokens_BT1[:, :-1]).logits
            first_BTV = logits_BTV.numpy() if first_BTV is None else first_BTV
            nll += torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), tokens_BT1[:, 1:].flatten(),
                                                     reduction="sum").item()
            tokens += tokens_BT1[:, 1:].numel()
    return nll / tokens, first_BTV


def measure(config) -> dict:
    """Both validation losses for a config whose init_from is gguf:PATH, and how far apart the models are."""
    path = config.init_from.removeprefix("gguf:")
    mesh = mesh_lib.make_mesh_for_present_devices(config.mesh)
    rules = mesh_lib.axis_rules(config)
    start = time.perf_counter()
    model, params, tokenizer = gguf.load(path, mesh=mesh, rules=rules)
    config.model.update(gguf.model_config_fields(path))
    context = evaluators.Context(config, "", model, tokenizer, corpus.load_corpus(config.data), mesh, rules)
    validation = evaluators.build("validation", context)
    ours = validation.run(params)
    ours_seconds = time.perf_counter() - start
    batches = [batch["tokens"] for batch in validation.batches]
    ours_first_BTV = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, batches[0][:, :-1]))

    start = time.perf_counter()
    theirs_loss, theirs_first_BTV = transformers_loss(path, batches)
    theirs_seconds = time.perf_counter() - start
    return {
        "file": path, "num_batches": len(batches), "batch_shape": list(batches[0].shape), "tokens": ours["tokens"],
        "decodelab": {**ours, "seconds": ours_seconds},
        "transformers": {"loss": theirs_loss, "perplexity": math.exp(theirs_loss), "seconds": theirs_seconds},
        "loss_difference": ours["loss"] - theirs_loss,
        "first_batch_max_abs_logit_difference": float(np.abs(ours_first_BTV - theirs_first_BTV).max()),
        "first_batch_max_abs_logit": float(np.abs(theirs_first_BTV).max()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2.py", help="a config file whose init_from is gguf:PATH")
    parser.add_argument("--out", default="benchmarks/results/gguf_validation")
    args = parser.parse_args(argv)
    spec = importlib.util.spec_from_file_location("config_module", args.config)
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    result = measure(config_module.get_config())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gguf_validation.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
