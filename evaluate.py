"""Evaluates the latest checkpoint of a workdir on whatever devices are present.

  python evaluate.py --config=configs/lm.py:tiny --workdir=workdirs/tiny

Reports validation loss, perplexity and bits per byte, prints completions of code prompts from the validation
split with each configured sampler, and writes everything to WORKDIR/eval_results.json.
"""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from checkpoints import huggingface
from checkpoints.manager import Checkpoints
from configs import cli
from data import corpus, pipeline, tokenizer as tokenizer_lib
from metrics import drafts
from models import registry
from parallel import distributed, mesh as mesh_lib
from samplers import ngram_store
from samplers.engine import Sampler, SamplerConfig
from samplers.sampling import SamplingConfig
from train import next_token_loss


def validation_metrics(model, params, batches, token_bytes_V, mesh, rules) -> dict:
    """Loss (nats/token), perplexity and bits per byte over fixed validation batches."""
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    token_bytes_V = jnp.asarray(token_bytes_V)

    @jax.jit
    def sums(params, tokens_BT1):
        logits_BTV, _ = model.apply({"params": params}, tokens_BT1[:, :-1])
        targets_BT = tokens_BT1[:, 1:]
        num_tokens = targets_BT.size
        return next_token_loss(logits_BTV, targets_BT) * num_tokens, num_tokens, token_bytes_V[targets_BT].sum()

    nll, tokens, num_bytes = 0.0, 0, 0
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for local_BT1 in batches:
            batch_nll, batch_tokens, batch_bytes = jax.device_get(
                sums(params, mesh_lib.global_batch(local_BT1, batch_sharding)))
            nll, tokens, num_bytes = nll + float(batch_nll), tokens + int(batch_tokens), num_bytes + int(batch_bytes)
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nll / math.log(2) / max(num_bytes, 1),
            "tokens": tokens}


# -------------------------------------------------------------------------------------------------------------
# Superposed Decoding
# -------------------------------------------------------------------------------------------------------------

def superposed_section(config, workdir, model, params, tokenizer, validation_source, mesh, rules) -> dict:
    """results["superposed"]; {"skipped": reason} when the default n-gram store WORKDIR/ngrams.npz is missing
    (an explicitly configured missing store is an error)."""
    spd = config.superposed
    store_path = spd.ngram_store or os.path.join(workdir, "ngrams.npz")
    if not spd.ngram_store and not os.path.exists(store_path):
        reason = f"no n-gram store at {store_path}; build it with: {ngram_store.BUILD_COMMAND}"
        print(f"Superposed Decoding skipped: {reason}")
        return {"skipped": reason}
    store = ngram_store.load_ngram_store(store_path)  # InputError naming the build command if missing
    grader = drafts.load_grader(spd.grader, tokenizer, mesh, rules) if spd.grader else None
    texts = (corpus.record_text(validation_source[i], config.data) for i in range(len(validation_source)))
    section = drafts.evaluate_superposed(model, params, tokenizer, texts, spd,
                                         stop_tokens=(tokenizer_lib.eos_id(tokenizer),), store=store, grader=grader,
                                         seed=config.seed, mesh=mesh, rules=rules)
    for setting in ("short", "long"):
        print(f"Superposed Decoding, {section[setting]['new_tokens']} new tokens, "
              f"{section['protocol']['prompts']} prompts:")
        for method, row in section[setting]["table"].items():
            precision = _fmt([row[f"P@{j}"] for j in range(1, spd.num_drafts + 1)])
            print(f"  {method:12s} ppl/draft {_fmt(row['perplexity_per_draft'])} best-of-k "
                  f"{_fmt(row['perplexity_best_of_k'])} P@1..k {precision} "
                  f"distinct-2 {_fmt(row['distinct_2'])} self-BLEU {_fmt(row['self_bleu'])}")
    return section


def _fmt(value) -> str:
    if isinstance(value, list):
        return "/".join(_fmt(v) for v in value)
    return "-" if value is None else f"{value:.2f}"


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the workdir's latest checkpoint, or the `config.init_from` checkpoint when it has none."""
    config, hf_checkpoint = huggingface.resolve_init_from(config)
    distributed.initialize(config.distributed)
    mesh = mesh_lib.make_mesh_for_present_devices(config.mesh)
    rules = mesh_lib.axis_rules(config)

    # ---------------------------------------------------------------------------------------------------------
    # Parameters: restored onto this machine's mesh, whatever mesh wrote them.
    # ---------------------------------------------------------------------------------------------------------
    model = registry.build(config.model)
    abstract_params, param_shardings = mesh_lib.sharded_abstract_params(model, mesh, rules)
    checkpoints = Checkpoints(workdir)
    step = checkpoints.latest_step()
    if step is None and hf_checkpoint:
        params = huggingface.load_hf_params(hf_checkpoint, config.model, param_shardings)
    else:
        params = checkpoints.restore_params(abstract_params, step)
    checkpoints.close()

    # ---------------------------------------------------------------------------------------------------------
    # Validation loss, perplexity, bits per byte.
    # ---------------------------------------------------------------------------------------------------------
    sources = corpus.load_corpus(config.data)
    tokenizer = tokenizer_lib.load_or_train_tokenizer(config.data, workdir, sources["train"])
    batches = pipeline.eval_batches(config.data, tokenizer, sources["validation"],
                                    num_batches=config.evaluate.num_batches, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    results = {"step": step, "checkpoint": config.init_from if step is None else checkpoints.directory,
               "validation": validation_metrics(
        model, params, batches, tokenizer_lib.token_byte_lengths(tokenizer, config.model.vocab_size), mesh, rules)}
    print(f"step {step}: validation loss {results['validation']['loss']:.4f}, "
          f"perplexity {results['validation']['perplexity']:.2f}, "
          f"bits per byte {results['validation']['bits_per_byte']:.4f}")

    # ---------------------------------------------------------------------------------------------------------
    # Completions of code prompts from the validation split, with each sampler.
    # ---------------------------------------------------------------------------------------------------------
    prompts = pipeline.validation_prompts(config.data, sources["validation"], config.evaluate.num_prompts,
                                          config.evaluate.prompt_chars)
    results["samples"] = {}
    for name, sampling in (config.evaluate.samplers.items() if prompts else ()):
        sampler = Sampler(model, params, tokenizer, SamplerConfig(
            max_new_tokens=config.evaluate.max_new_tokens, stop_tokens=(tokenizer_lib.eos_id(tokenizer),),
            sampling=SamplingConfig(**sampling)), mesh=mesh, rules=rules)
        output = sampler.generate(prompts, seed=config.seed)
        results["samples"][name] = [{"prompt": prompt, "completion": text}
                                    for prompt, text in zip(prompts, output.text)]
        if name in ("greedy", "nucleus"):
            for prompt, text in zip(prompts, output.text):
                print(f"{'-' * 30} {name} {'-' * 30}\n{prompt}\033[1m{text}\033[0m")

    # ---------------------------------------------------------------------------------------------------------
    # Superposed Decoding: k drafts vs nucleus run k times vs greedy (metrics/drafts.py).
    # ---------------------------------------------------------------------------------------------------------
    results["superposed"] = superposed_section(config, workdir, model, params, tokenizer, sources["validation"],
                                               mesh, rules)

    if jax.process_index() == 0:
        path = os.path.join(workdir, "eval_results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)  # A reader never sees half a file, and the old results survive a crash.
        print(f"results written to {path}")
    return results


if __name__ == "__main__":
    cli.main(lambda: evaluate(cli.CONFIG.value, cli.WORKDIR.value))
