"""Decode speed of the decodelab engine against Hugging Face transformers `generate` on the same weights.

  python benchmarks/decode.py --presets tiny,small --batch-sizes 1,16 --max-new-tokens 64 --out workdirs/bench
  GGUF=$(python -c "from configs import smollm2; print(smollm2.gguf_path())")   # the reference model, SmolLM2
  python benchmarks/decode.py --init-from=gguf:$GGUF --batch-sizes 1,16 --out workdirs/bench_smollm2

For each preset of configs/lm.py (random weights), or the checkpoint --init-from names (hf:DIR or gguf:FILE, as
config.init_from: its shape and its weights, dequantized to float32; the preset's runtime fields), and each batch
size it times, after a warm-up compile, greedy decoding of random prompts: decodelab end to end (prefill + decode
loop + host output) and the decode loop alone, and `LlamaForCausalLM.generate` with the same weights, prompts and
token count (decodelab's tokens are checked against it). It also reports the fraction of the memory-bandwidth
roofline each reaches: (parameter bytes + filled cache bytes) read per step / step time / the device's read
bandwidth (the HBM spec on a GPU, measured on a CPU). A decode step at batch 1 cannot beat the roofline, so
1 / transformers' fraction bounds any speedup over it. Writes decode.json and decode.png to --out.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import huggingface, init_from as init_from_lib
from configs import lm
from models import registry
from samplers.engine import Sampler, SamplerConfig

# Peak HBM bandwidth, bytes/s, by a substring of jax's device_kind (checked in order).
BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12))


def hf_model(params, model_config, device, dtype):
    """The same weights as a transformers model, through the Hugging Face export."""
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as directory:
        huggingface.export_hf(params, model_config, None, directory)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = None  # decode exactly max_new_tokens, as decodelab does here
    model.generation_config.pad_token_id = 0
    return model.to(device=device).eval()


def time_hf(model, prompts_BP, max_new_tokens, device, repeats, thread_counts):
    """Median seconds of `generate` with its fastest torch thread count (on a shared CPU, fewer threads than
    cores can be much faster), that count, and the new tokens."""
    import torch

    input_ids = torch.tensor(prompts_BP, device=device)
    kwargs = {"attention_mask": torch.ones_like(input_ids), "do_sample": False, "max_new_tokens": max_new_tokens,
              "min_new_tokens": max_new_tokens}
    best = None
    with torch.inference_mode():
        for threads in thread_counts:
            torch.set_num_threads(threads)
            model.generate(input_ids, **kwargs)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = model.generate(input_ids, **kwargs)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            if best is None or np.median(times) < best[0]:
                best = (float(np.median(times)), threads)
    return best[0], best[1], out[:, input_ids.shape[1]:].cpu().numpy()


def time_decodelab(sampler, prompts, repeats):
    """Median seconds end to end, of the prefill alone and of the decode loop alone; and the tokens."""
    output = sampler.generate_tokens(prompts)  # compiles
    end_to_end, prefill, decode = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        output = sampler.generate_tokens(prompts)
        end_to_end.append(time.perf_counter() - start)
        start = time.perf_counter()
        state = jax.block_until_ready(sampler.prefill(prompts))
        middle = time.perf_counter()
        jax.block_until_ready(sampler.decode(state))
        prefill.append(middle - start)
        decode.append(time.perf_counter() - middle)
    return float(np.median(end_to_end)), float(np.median(prefill)), float(np.median(decode)), output.tokens


def bytes_per_step(sampler, model_config, batch, prompt_len, max_new_tokens):
    """Bytes one decode step must read: every parameter, and the cache filled so far (averaged over the steps)."""
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(sampler.params))
    mean_filled = prompt_len + max_new_tokens / 2
    cache_bytes = (2 * model_config.num_layers * batch * model_config.num_kv_heads * model_config.head_dim
                   * mean_filled * jnp.dtype(model_config.dtype).itemsize)
    return int(param_bytes + cache_bytes)


def peak_bandwidth(num_bytes, on_gpu):
    """Bytes/s the device can read: the HBM spec on a GPU. On a CPU, measured here on `num_bytes` (so a model that
    fits in cache gets the cache's bandwidth, as its decode steps do): the fastest of 20 reads of that many bytes
    by a BLAS matrix-vector product and by sums split over one thread per core."""
    if on_gpu:
        device_kind = jax.devices()[0].device_kind
        return next((b for name, b in BANDWIDTH if name in device_kind), None)
    matrix = np.ones((num_bytes // 4096, 1024), np.float32)
    vector = np.ones((matrix.shape[0],), np.float32)
    cores = len(os.sched_getaffinity(0))
    parts = np.array_split(matrix, cores)
    with concurrent.futures.ThreadPoolExecutor(cores) as pool:  # numpy sums release the GIL
        readers = (lambda: vector @ matrix, lambda: list(pool.map(np.sum, parts)))
        best = float("inf")
        for read in readers:
            for _ in range(20):
                start = time.perf_counter()
                read()
                best = min(best, time.perf_counter() - start)
    return matrix.nbytes / best


def run_one(preset, init_from, batch, args, on_gpu, hf_device, thread_counts):
    config = lm.get_config(preset)
    config.init_from = init_from
    model_config = init_from_lib.resolve(config)[0].model
    dtype = args.dtype or ("float32" if not on_gpu else model_config.dtype)
    model_config.update(softmax_implementation=args.softmax_implementation, dtype=dtype, remat="none")
    model = registry.build(model_config)
    if init_from:
        params = init_from_lib.load_params(init_from, model_config, shardings=None)
    else:
        params = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, *model.example_inputs())["params"]))(
            jax.random.key(0))
    num_params = sum(x.size for x in jax.tree.leaves(params))
    prompts = np.random.default_rng(0).integers(0, model_config.vocab_size, (batch, args.prompt_len)).tolist()
    sampler = Sampler(model, params, None, SamplerConfig(max_new_tokens=args.max_new_tokens,
                                                          prompt_buckets=(args.prompt_len,)))
    end_to_end, prefill, decode, tokens = time_decodelab(sampler, prompts, args.repeats)
    N = args.max_new_tokens
    result = {"preset": preset, "init_from": init_from, "batch": batch, "params": int(num_params), "dtype": dtype,
              "prompt_len": args.prompt_len, "max_new_tokens": N,
              "softmax_implementation": args.softmax_implementation,
              "decodelab_end_to_end_s": end_to_end, "decodelab_prefill_s": prefill, "decodelab_decode_s": decode,
              "decodelab_tokens_per_s": batch * N / end_to_end,
              "decodelab_decode_tokens_per_s": batch * (N - 1) / decode}
    step_bytes = bytes_per_step(sampler, model_config, batch, args.prompt_len, N)
    bandwidth = peak_bandwidth(step_bytes, on_gpu)
    result.update(bytes_per_step=step_bytes, peak_bytes_per_s=bandwidth,
                  roofline_fraction=step_bytes * (N - 1) / decode / bandwidth if bandwidth else None)
    if hf_device:
        hf = hf_model(params, model_config, hf_device, dtype)
        seconds, threads, hf_tokens = time_hf(hf, prompts, N, hf_device, args.hf_repeats, thread_counts)
        same_BN = np.array(tokens) == hf_tokens
        result.update(hf_generate_s=seconds, hf_tokens_per_s=batch * N / seconds, hf_torch_threads=threads,
                      speedup_vs_hf=seconds / end_to_end,
                      # generate's time includes its prefill, so this fraction is a lower bound on its decode's
                      # and 1 / fraction an upper bound on the speedup any implementation could reach over it.
                      hf_roofline_fraction=step_bytes * N / seconds / bandwidth if bandwidth else None,
                      # Random weights give near-flat logits, so float noise may flip a late argmax; a trained
                      # model's prompts are random tokens too.
                      tokens_equal_hf_fraction=float(same_BN.mean()),
                      first_token_equal_hf_fraction=float(same_BN[:, 0].mean()))
        del hf
    return result


def plot(results, path, on_gpu):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{os.path.basename(r['init_from']) or r['preset']}\nbatch {r['batch']}" for r in results]
    series = [("decodelab decode loop", "decodelab_decode_tokens_per_s"),
              ("decodelab end to end", "decodelab_tokens_per_s"), ("transformers generate", "hf_tokens_per_s")]
    series = [(name, key) for name, key in series if any(key in r for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(6 + 3 * len(results), 4.5))
    ax = axes[0]
    width = 0.8 / len(series)
    x = np.arange(len(results))
    for i, (name, key) in enumerate(series):
        values = [r.get(key, 0.0) for r in results]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    for xi, r in zip(x, results):
        if "speedup_vs_hf" in r:
            ax.annotate(f"{r['speedup_vs_hf']:.1f}x", (xi, r["decodelab_tokens_per_s"]), ha="center",
                        va="bottom", fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (log)")
    ax.set_title(f"greedy decode, {jax.devices()[0].device_kind}")
    ax.legend(fontsize=8)
    ax = axes[1]
    fractions = [("decodelab decode loop", "roofline_fraction"), ("transformers generate", "hf_roofline_fraction")]
    fractions = [(name, key) for name, key in fractions if any(r.get(key) for r in results)]
    for i, (name, key) in enumerate(fractions):
        ax.bar(x + (i - (len(fractions) - 1) / 2) * 0.4, [r.get(key) or 0.0 for r in results], 0.4, label=name)
    if on_gpu:
        ax.axhline(0.7, color="gray", linestyle="--", label="70% target")
    ax.set_xticks(x, labels)
    ax.set_ylabel("fraction of the memory-bandwidth roofline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="", help="comma-separated configs/lm.py presets; default tiny,small "
                        "(and gpu_1b on a GPU), or tiny with --init-from")
    parser.add_argument("--init-from", default="", help="hf:DIR or gguf:FILE: its weights instead of random ones")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--softmax-implementation", default="xla", help="reference | xla | cudnn | pallas")
    parser.add_argument("--dtype", default="", help="compute dtype; default float32 on CPU, the preset's on GPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-repeats", type=int, default=1)
    parser.add_argument("--torch-threads", default="", help="comma-separated torch thread counts to try for "
                        "transformers (the fastest is kept); default 1 and all available cores")
    parser.add_argument("--skip-hf", action="store_true", help="do not run transformers generate")
    parser.add_argument("--out", default="workdirs/bench_decode")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    default_presets = "tiny" if args.init_from else "tiny,small,gpu_1b" if on_gpu else "tiny,small"
    presets = (args.presets or default_presets).split(",")
    hf_device = None
    cores = len(os.sched_getaffinity(0))
    thread_counts = [int(t) for t in args.torch_threads.split(",")] if args.torch_threads else sorted({1, cores})
    if not args.skip_hf:
        import torch

        # transformers on a GPU only with a CUDA build of torch; a CPU torch beside a GPU jax would not compare.
        hf_device = "cuda" if torch.cuda.is_available() else (None if on_gpu else "cpu")

    results = []
    for preset in presets:
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            result = run_one(preset, args.init_from, batch, args, on_gpu, hf_device, thread_counts)
            results.append(result)
            print(json.dumps(result), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"device": jax.devices()[0].device_kind, "results": results},
                                                indent=2))
    plot(results, out / "decode.png", on_gpu)
    print(f"wrote {out / 'decode.json'} and {out / 'decode.png'}")


if __name__ == "__main__":
    main()
