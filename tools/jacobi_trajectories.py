"""Writes CLLM's training data: Jacobi trajectories of the base model on prompts from the training split, into WORKDIR
as an array_record dataset (data/jacobi_trajectories.py) that consistency training reads (configs/cllm.py).

  python tools/jacobi_trajectories.py --config=configs/cllm.py:tiny --workdir=workdirs/cllm_tiny_trajectories

The base model is config.init_from (a workdir:, hf: or gguf: checkpoint) and the prompts are next-line prompts of
the train split (metrics/drafts.py's rule, which the Jacobi evaluator and benchmark apply to the validation split),
config.trajectories.prompt_tokens long. Each prompt is decoded block by block as the reference's data tool does: a
block of `window` tokens starts as copies of the newest token and is iterated, y <- argmax p(y | context, y), until
it stops changing; the states before the fixed point are recorded, the fixed point is appended to the context, and
the next block starts, up to new_tokens tokens or a stop token. Blocks whose fixed point has a run of
max_identical_run identical tokens are dropped (the reference's cleaning; 0 keeps all), as are blocks whose first
state was already the fixed point (nothing to learn).

Resumable: prompts go in shards of prompts_per_shard, each written whole; a rerun skips the shards present, and
dataset_info.json (records, states, tokens, bytes, seconds) is written when the last shard is.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import init_from
from configs import cli
from data import corpus, jacobi_trajectories, tokenizer as tokenizer_lib
from errors import InputError, checks
from metrics import drafts
from models import registry


def _check(section) -> None:
    for name, minimum in (("window", 1), ("num_prompts", 1), ("prompt_tokens", 1), ("new_tokens", 1),
                          ("batch_size", 1), ("prompts_per_shard", 1), ("max_identical_run", 0)):
        checks.integer(f"config.trajectories.{name}", section[name], minimum=minimum)
    if section.new_tokens % section.window:
        raise InputError(f"config.trajectories.new_tokens={section.new_tokens} must be a multiple of "
                         f"config.trajectories.window={section.window} (whole blocks)")


@functools.partial(jax.jit, static_argnums=0)
def _prefill(model, params, prompt_BP, cache):
    logits_BPV, cache = model.apply({"params": params}, prompt_BP, cache)
    return jnp.argmax(logits_BPV[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block(model, window, params, cache, last_B):
    """One block of Jacobi iteration after the cache and the newest token last_B (not in the cache yet):
    (states [B, window, window], their count per row, fixed point [B, window], the cache with last_B and the fixed
    point but its final token written, that final token). At most window + 1 forwards: each iteration fixes at
    least one more token, so at most `window` states precede the fixed point."""
    B, W = last_B.shape[0], window
    rows_B = jnp.arange(B)

    def iterate(y_BW):
        logits_BTV, _ = model.apply({"params": params}, jnp.concatenate([last_B[:, None], y_BW], axis=1), cache)
        return jnp.argmax(logits_BTV[:, :W], axis=-1).astype(jnp.int32)

    def body(carry):
        step, y_BW, done_B, states_BJW, num_states_B = carry
        next_BW = iterate(y_BW)
        recorded_B = ~done_B & ~jnp.all(next_BW == y_BW, axis=1)
        slot_B = jnp.minimum(num_states_B, W - 1)
        states_BJW = states_BJW.at[rows_B, slot_B].set(
            jnp.where(recorded_B[:, None], y_BW, states_BJW[rows_B, slot_B]))
        done_B = done_B | ~recorded_B
        return (step + 1, jnp.where(done_B[:, None], y_BW, next_BW), done_B, states_BJW,
                num_states_B + recorded_B)

    start = (0, jnp.broadcast_to(last_B[:, None], (B, W)), jnp.zeros((B,), bool), jnp.zeros((B, W, W), jnp.int32),
             jnp.zeros((B,), jnp.int32))
    _, fixed_BW, _, states_BJW, num_states_B = jax.lax.while_loop(
        lambda carry: (carry[0] <= W) & ~jnp.all(carry[2]), body, start)
    _, cache = model.apply({"params": params}, jnp.concatenate([last_B[:, None], fixed_BW[:, :-1]], axis=1), cache)
    return states_BJW, num_states_B, fixed_BW, cache, fixed_BW[:, -1]


def _longest_run(tokens) -> int:
    tokens = np.asarray(tokens)
    changes = np.flatnonzero(np.diff(tokens)) + 1
    return int(np.diff(np.concatenate([[0], changes, [len(tokens)]])).max())


def trajectories(model, params, prompts: list[list[int]], section, stop_token: int) -> tuple[list[bytes], dict]:
    """The records of one batch of equal-length prompts, and their counts."""
    W = section.window
    B = len(prompts)
    cache = model.init_cache(B, section.prompt_tokens + section.new_tokens + 1)
    last_B, cache = _prefill(model, params, jnp.asarray(prompts, jnp.int32), cache)
    contexts = [list(prompt) + [int(token)] for prompt, token in zip(prompts, np.asarray(last_B))]
    live = [token != stop_token for token in np.asarray(last_B)]
    records, counts = [], {"blocks": 0, "states": 0, "dropped_repetitive": 0, "dropped_converged": 0}
    for _ in range(section.new_tokens // W):
        if not any(live):
            break
        states_BJW, num_states_B, fixed_BW, cache, last_B = _block(model, W, params, cache, last_B)
        states_BJW, num_states_B, fixed_BW = (np.asarray(x) for x in (states_BJW, num_states_B, fixed_BW))
        for row in np.flatnonzero(live):
            fixed, num_states = fixed_BW[row], int(num_states_B[row])
            stops = np.flatnonzero(fixed == stop_token)
            valid = int(stops[0]) + 1 if len(stops) else W
            counts["blocks"] += 1
            if num_states == 0:
                counts["dropped_converged"] += 1
            elif section.max_identical_run and _longest_run(contexts[row][-1:] + fixed[:valid].tolist()) >= \
                    section.max_identical_run:
                counts["dropped_repetitive"] += 1
            else:
                records.append(jacobi_trajectories.encode(contexts[row], states_BJW[row, :num_states], fixed, valid))
                counts["states"] += num_states
            contexts[row] += fixed.tolist()
            live[row] = not len(stops)
    return records, counts


def write(config, workdir: str) -> dict:
    section = config.trajectories
    _check(section)
    if not config.init_from:
        raise InputError("config.init_from is empty: Jacobi trajectories come from a base model (workdir:DIR, hf:DIR "
                         "or gguf:FILE)")
    config, checkpoint = init_from.resolve(config)
    os.makedirs(workdir, exist_ok=True)
    sources = corpus.load_corpus(config.data)
    tokenizer = tokenizer_lib.load_or_train_tokenizer(config.data, workdir, sources["train"], config.model.vocab_size)
    model = registry.build(config.model)
    params = init_from.load_params(checkpoint, config.model, shardings=None)

    train = sources["train"]
    texts = (corpus.record_text(train[i], config.data) for i in range(len(train)))
    prompts = [p["prompt_tokens"] for p in drafts.next_line_prompts(tokenizer, texts, section.prompt_tokens,
                                                                    section.window, section.num_prompts, config.seed)]
    if not prompts:
        raise InputError(f"config.data.corpus={config.data.corpus!r}: the train split has no next-line prompts of "
                         f"config.trajectories.prompt_tokens={section.prompt_tokens} tokens")
    # What this run writes, so that a rerun with other settings cannot mix its shards with these.
    settings = {"base": checkpoint, "seed": config.seed, "corpus": config.data.corpus, "num_prompts": len(prompts),
                **{key: section[key] for key in ("window", "prompt_tokens", "new_tokens", "prompts_per_shard",
                                                 "max_identical_run")}}
    progress_path = os.path.join(workdir, "progress.json")
    progress = {"settings": settings, "shards": {}}
    if os.path.isfile(progress_path):
        with open(progress_path) as file:
            progress = json.load(file)
        if progress["settings"] != settings:
            changed = sorted(key for key in settings if progress["settings"].get(key) != settings[key])
            raise InputError(f"--workdir={workdir} holds trajectories written with other settings ({', '.join(changed)}"
                             f" differ); give a new --workdir")
    shards = progress["shards"]
    present = {os.path.basename(path) for path in jacobi_trajectories.shard_paths(workdir)}
    stop_token = tokenizer_lib.eos_id(tokenizer)
    per_shard = section.prompts_per_shard
    for index, start in enumerate(range(0, len(prompts), per_shard)):
        name = jacobi_trajectories.SHARD_PATTERN.format(index)
        if name in present and name in shards:
            continue
        began = time.perf_counter()
        shard_prompts = prompts[start:start + per_shard]
        records, counts = [], {}
        for batch_start in range(0, len(shard_prompts), section.batch_size):
            batch = shard_prompts[batch_start:batch_start + section.batch_size]
            batch_records, batch_counts = trajectories(model, params, batch, section, stop_token)
            records += batch_records
            counts = {key: counts.get(key, 0) + value for key, value in batch_counts.items()}
        path = jacobi_trajectories.write_shard(workdir, index, records)
        shards[name] = {"prompts": len(shard_prompts), "records": len(records), **counts,
                        "bytes": os.path.getsize(path), "seconds": time.perf_counter() - began}
        with open(progress_path + ".tmp", "w") as file:
            json.dump(progress, file, indent=1)
        os.replace(progress_path + ".tmp", progress_path)
        print(f"{name}: {shards[name]}", flush=True)

    totals = {key: sum(shard[key] for shard in shards.values())
              for key in ("prompts", "records", "blocks", "states", "dropped_repetitive", "dropped_converged",
                          "bytes", "seconds")}
    info = {**settings, "shards": len(shards), **totals,
            "mean_states_per_block": totals["states"] / max(totals["records"], 1)}
    with open(os.path.join(workdir, jacobi_trajectories.INFO_FILE), "w") as file:
        json.dump(info, file, indent=1)
    print(f"wrote {info['records']:,} blocks ({info['states']:,} states) of {info['prompts']} prompts to {workdir}: "
          f"{info['bytes'] / 2**20:.2f} MiB in {info['seconds']:.0f} s")
    return info


if __name__ == "__main__":
    cli.main(lambda: write(cli.CONFIG.value, cli.WORKDIR.value))
