"""Lightning Attention-2 speed against sequence length, side by side in one process.

Times forward and forward+backward for: the Pallas kernel (compiled on GPU/TPU; on CPU only in interpret mode at
the smallest length, labelled), the chunked jnp version, softmax attention (jax.nn.dot_product_attention, cuDNN
on GPU, XLA otherwise) and, on GPU when `fla` is importable, flash-linear-attention's chunk_simple_gla (Triton).
Writes lightning.json (device, versions, shapes, times, time per token) and lightning.png (time per token vs
length) into --out. H100 targets checked in the JSON: per-token time flat within 20% from 2k to 64k; faster
than cuDNN softmax from 4k; at least as fast as fla's chunk_simple_gla.

    python benchmarks/lightning.py --lengths 512,1024,2048,4096,8192 --batch 1 --heads 4 --dim 64 --out DIR
    python benchmarks/lightning.py --device-kind gpu --lengths 2048,4096,8192,16384,32768,65536 --heads 16 \
        --dim 128 --dtype bfloat16 --out DIR
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from errors import InputError
from pallas_kernels.lightning_attention import lightning_attention

MODES = ("fwd", "fwd+bwd")


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-kind", default="auto", choices=("auto", "cpu", "gpu", "tpu"))
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head dim of q, k and v")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--softmax-max-length", type=int, default=None, help="skip softmax above this length")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per point (>= 3 calls)")
    parser.add_argument("--out", required=True, help="directory for lightning.json and lightning.png")
    return parser.parse_args(argv)


def time_call(fn, args, min_time):
    """Median seconds per call after one compiling call; at least 3 timed calls and `min_time` seconds."""
    jax.block_until_ready(fn(*args))
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _jax_step(attend, mode):
    """jit of the forward, or of forward + backward (a vjp with a fixed output cotangent)."""
    if mode == "fwd":
        return jax.jit(attend)

    def fwd_bwd(q, k, v):
        o, pullback = jax.vjp(attend, q, k, v)
        return pullback(jnp.ones_like(o))

    return jax.jit(fwd_bwd)


def _jax_providers(platform_name, decay_H, block_size, dtype):
    def linear(implementation, interpret=None):
        return lambda q, k, v: lightning_attention(
            q, k, v, decay_H, implementation=implementation, block_size=block_size, interpret=interpret
        )[0]

    # cuDNN attention takes only 16-bit inputs; fp32 on GPU falls back to XLA and says so in the label.
    softmax_impl = "cudnn" if platform_name == "gpu" and dtype == jnp.bfloat16 else "xla"

    def softmax(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=softmax_impl)

    providers = {"chunked (jnp)": linear("chunked"), f"softmax ({softmax_impl})": softmax}
    if platform_name == "cpu":
        providers["pallas (interpret, smallest length only)"] = linear("pallas", interpret=True)
    else:
        providers["pallas"] = linear("pallas", interpret=False)
    return providers


def _fla_provider(decay_H):
    """fla's chunk_simple_gla timed with CUDA events, or None when fla/torch are absent."""
    if importlib.util.find_spec("fla") is None:
        return None
    import torch
    from fla.ops.simple_gla import chunk_simple_gla

    g_gamma = torch.tensor(np.log(np.asarray(decay_H)), device="cuda", dtype=torch.float32)

    def run(q_np, k_np, v_np, mode, min_time):
        q, k, v = (torch.tensor(x, device="cuda", dtype=torch.bfloat16).requires_grad_(mode != "fwd")
                   for x in (q_np, k_np, v_np))

        def call():
            o, _ = chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)
            if mode != "fwd":
                o.backward(torch.ones_like(o))

        call()
        torch.cuda.synchronize()
        times, start = [], time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < min_time:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        return statistics.median(times)

    return run


def per_token(results, name, mode, batch):
    """{length: seconds per token} of one provider and mode, the lengths it was timed at."""
    entry = results.get(name, {}).get(mode, {})
    return {int(t): s / (batch * int(t)) for t, s in entry.items() if s is not None}


def _targets(results, batch):
    """The H100 targets, evaluated on whatever lengths were measured (None where a number is missing)."""
    out = {}
    for mode in MODES:
        pallas = per_token(results, "pallas", mode, batch)
        flat = [pallas[t] for t in pallas if 2048 <= t <= 65536]
        softmax = next((per_token(results, n, mode, batch) for n in results if n.startswith("softmax")), {})
        fla = per_token(results, "fla chunk_simple_gla", mode, batch)
        from_4k = [t for t in pallas if t >= 4096 and t in softmax]
        out[mode] = {
            "pallas_per_token_max_over_min_2k_64k": max(flat) / min(flat) if len(flat) > 1 else None,
            "pallas_faster_than_softmax_from_4k": all(pallas[t] < softmax[t] for t in from_4k) if from_4k else None,
            "pallas_over_fla_time": {t: pallas[t] / fla[t] for t in pallas if t in fla} or None,
        }
    return out


def plot_modes(axes, results, batch):
    """Time per token against length, one provider a line, on one axis per mode."""
    for ax, mode in zip(axes, MODES):
        for name, by_mode in results.items():
            points = sorted((int(t), s) for t, s in by_mode.get(mode, {}).items() if s is not None)
            if points:
                lengths, secs = zip(*points)
                ax.plot(lengths, [1e6 * s / (batch * t) for t, s in points], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("time per token (us)")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)


def _plot(results, batch, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_modes(axes, results, batch)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def decay_rates(num_heads):
    """RetNet-style per-head decay rates, all in (0, 1)."""
    return jnp.asarray(1.0 - 2.0 ** (-5.0 - np.arange(num_heads)), jnp.float32)


def measure(lengths, *, batch, heads, dim, dtype, block_size, min_time, softmax_max_length=None, deadline=None):
    """Median seconds per call, {provider: {mode: {str(length): seconds}}}, printed as they are timed. None marks
    a point not timed: interpreted Pallas above the smallest length, softmax above softmax_max_length, and every
    length reached after `deadline` (a time.perf_counter() value)."""
    platform_name = jax.default_backend()
    B, H, D = batch, heads, dim
    decay_H = decay_rates(H)
    providers = _jax_providers(platform_name, decay_H, block_size, dtype)
    fla = _fla_provider(decay_H) if platform_name == "gpu" else None
    results = {name: {mode: {} for mode in MODES} for name in [*providers, *(["fla chunk_simple_gla"] if fla else [])]}

    for T in lengths:
        late = deadline is not None and time.perf_counter() > deadline
        key = jax.random.key(T)
        q, k, v = (0.1 * jax.random.normal(kk, (B, T, H, D), jnp.float32).astype(dtype)
                   for kk in jax.random.split(key, 3))
        for name, attend in providers.items():
            for mode in MODES:
                skip = late or (name.startswith("pallas (interpret") and T != lengths[0]) or (
                    name.startswith("softmax") and softmax_max_length and T > softmax_max_length
                )
                seconds = None if skip else time_call(_jax_step(attend, mode), (q, k, v), min_time)
                results[name][mode][str(T)] = seconds
                if seconds is not None:
                    print(f"T={T:6d} {name:42s} {mode:8s} {1e3 * seconds:10.3f} ms "
                          f"{1e9 * seconds / (B * T):10.1f} ns/token", flush=True)
        if fla:
            for mode in MODES:
                seconds = None if late else fla(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)), mode,
                                                min_time)
                results["fla chunk_simple_gla"][mode][str(T)] = seconds
                if seconds is not None:
                    print(f"T={T:6d} {'fla chunk_simple_gla':42s} {mode:8s} {1e3 * seconds:10.3f} ms", flush=True)
    return results


def environment():
    """The device and versions a report was measured with."""
    device = jax.devices()[0]
    return {
        "device": {"platform": jax.default_backend(), "kind": device.device_kind, "count": jax.device_count(),
                   "host": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": importlib.import_module("jaxlib").__version__},
    }


def main(argv=None):
    args = _parse_args(argv)
    platform_name = jax.default_backend()
    if args.device_kind != "auto" and args.device_kind != platform_name:
        raise InputError(f"--device-kind={args.device_kind} but jax's default backend is {platform_name}")
    lengths = sorted(int(x) for x in args.lengths.split(","))
    B, H, D = args.batch, args.heads, args.dim
    results = measure(lengths, batch=B, heads=H, dim=D, dtype=jnp.dtype(args.dtype), block_size=args.block_size,
                      min_time=args.min_time, softmax_max_length=args.softmax_max_length)
    report = {
        **environment(),
        "shapes": {"batch": B, "heads": H, "dim": D, "dtype": args.dtype, "block_size": args.block_size,
                   "lengths": lengths, "decay_H": np.asarray(decay_rates(H)).tolist()},
        "seconds": results,
        "ns_per_token": {name: {mode: {t: (None if s is None else 1e9 * s / (B * int(t))) for t, s in times.items()}
                                for mode, times in by_mode.items()} for name, by_mode in results.items()},
        "targets": _targets(results, B),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lightning.json"), "w") as f:
        json.dump(report, f, indent=2)
    title = (f"Lightning Attention-2 on {report['device']['kind']}: B={B} H={H} D={D} {args.dtype} "
             f"block={args.block_size}")
    _plot(results, B, title, os.path.join(args.out, "lightning.png"))
    print(f"wrote {args.out}/lightning.json and {args.out}/lightning.png")


if __name__ == "__main__":
    main()
