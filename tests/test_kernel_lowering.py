"""Every Pallas kernel lowered for CUDA (Triton) and TPU (Mosaic) at realistic shapes, with neither attached.

Lowering for an absent platform: jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)) under
jax.sharding.use_abstract_mesh with an AbstractDevice of that platform (JAX >= 0.11 reads the GPU architecture or
TPU generation from it; the kernels' dispatchers read the target platform from it). Pallas's block-shape,
power-of-two and missing-primitive checks run at this point; Triton-to-PTX and Mosaic-to-TPU compilation (shared
memory and VMEM limits, tile minimums) and numerics do not, so those limits are decodelab's own checks
(pallas_kernels/decode_attention/block_sizes.py), and numerics are tested in interpret mode elsewhere.
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import AbstractDevice, AbstractMesh

from errors import InputError
from pallas_kernels.decode_attention import BlockSizes, decode_attention, decode_attention_pallas
from pallas_kernels.lightning_attention import kernel as lightning_kernel, lightning_attention, lightning_decode_step
from pallas_kernels.low_rank_decode_attention import low_rank_decode_attention
from pallas_kernels.splash_attention import splash_attention

TARGETS = {
    "cuda": AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
    "tpu": AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
}
CUSTOM_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
# The kernel's name as each custom call records it (attributes print sorted: Triton's `name` follows its `ir`).
KERNEL_NAME = {"cuda": r'name = "(\w+)", num_stages', "tpu": r'kernel_name = "(\w+)"'}

BF16, F32 = jnp.bfloat16, jnp.float32
# Decode attention: batch 8, 32 query / 8 KV heads, cache 8192, head_dim 128.
DECODE_ARGS = (
    jax.ShapeDtypeStruct((8, 32, 128), BF16), jax.ShapeDtypeStruct((8, 8, 8192, 128), BF16),
    jax.ShapeDtypeStruct((8, 8, 8192, 128), BF16), jax.ShapeDtypeStruct((8,), jnp.int32),
)
# MatryoshkaKV decode attention: as DECODE_ARGS with the cache compressed to 64 of 128 columns per head.
LOW_RANK_DECODE_ARGS = (
    DECODE_ARGS[0], jax.ShapeDtypeStruct((8, 8, 8192, 64), BF16), jax.ShapeDtypeStruct((8, 8, 8192, 64), BF16),
    DECODE_ARGS[3], jax.ShapeDtypeStruct((8, 128, 64), F32), jax.ShapeDtypeStruct((8, 128, 64), F32),
    jax.ShapeDtypeStruct((8,), jnp.int32), jax.ShapeDtypeStruct((8,), jnp.int32),
)
# Lightning: T 8192, 16 heads, head_dim 128; decays of the ALiBi schedule.
LIGHTNING_DECAY = jnp.exp(-(2.0 ** (-8.0 * jnp.arange(1, 17) / 16)))


def _lightning_args(dtype, T=8192):
    qkv = jax.ShapeDtypeStruct((1, T, 16, 128), dtype)
    return qkv, qkv, qkv, jax.ShapeDtypeStruct((1, 16, 128, 128), F32)


@contextlib.contextmanager
def _target(platform):
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=TARGETS[platform])):
        yield


def _lower(platform, fn, *args):
    with _target(platform):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _kernel_calls(platform, text):
    """Names of the kernels the lowered module calls; also checks each is the backend's custom call."""
    names = re.findall(KERNEL_NAME[platform], text)
    assert text.count(f"custom_call @{CUSTOM_CALLS[platform]}(") == len(names)
    return sorted(names)


def _lightning_value_and_grad(q, k, v, state):
    def loss(q, k, v, state):
        o, final = lightning_attention(
            q, k, v, LIGHTNING_DECAY, initial_state_BHDE=state, implementation="pallas", block_size=64
        )
        return o.astype(F32).sum() + final.sum()

    # value_and_grad keeps the forward kernel in the module next to the backward ones.
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, state)


def _lightning_decode(q, k, v, state):
    return lightning_decode_step(q, k, v, LIGHTNING_DECAY, state, implementation="pallas")


DECODE_STEP_ARGS = (*(jax.ShapeDtypeStruct((8, 16, 128), BF16),) * 3, jax.ShapeDtypeStruct((8, 16, 128, 128), F32))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_decode_attention_lowers(platform):
    text = _lower(platform, decode_attention, *DECODE_ARGS)
    assert _kernel_calls(platform, text) == ["decode_attention_partials"]
    assert "stablehlo.optimization_barrier" in text  # the split combine's, against NaNs after compilation


# The model's own call: queries already in the key basis, no bases.
LOW_RANK_DECODE_IN_BASIS_ARGS = (jax.ShapeDtypeStruct((8, 32, 64), BF16), *LOW_RANK_DECODE_ARGS[1:4], None, None,
                                 *LOW_RANK_DECODE_ARGS[6:])


@pytest.mark.parametrize("args", [LOW_RANK_DECODE_ARGS, LOW_RANK_DECODE_IN_BASIS_ARGS], ids=["bases", "in-basis"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_low_rank_decode_attention_lowers(platform, args):
    text = _lower(platform, low_rank_decode_attention, *args)
    assert _kernel_calls(platform, text) == ["low_rank_decode_attention_partials"]


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lightning_attention_forward_and_backward_lower(platform, dtype):
    text = _lower(platform, _lightning_value_and_grad, *_lightning_args(dtype))
    expected = {
        "cuda": ["lightning_attention_bwd", "lightning_attention_fwd"],
        "tpu": ["lightning_attention_bwd_dkdv", "lightning_attention_bwd_dq", "lightning_attention_fwd"],
    }
    assert _kernel_calls(platform, text) == expected[platform]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lightning_decode_step_lowers(platform):
    text = _lower(platform, _lightning_decode, *DECODE_STEP_ARGS)
    assert _kernel_calls(platform, text) == ["lightning_attention_decode"]


SPLASH_ARGS = (
    jax.ShapeDtypeStruct((2, 8192, 32, 128), BF16), *(jax.ShapeDtypeStruct((2, 8192, 8, 128), BF16),) * 2
)


def _splash_value_and_grad(q, k, v):
    return jax.value_and_grad(lambda q, k, v: splash_attention(q, k, v).astype(F32).sum(), argnums=(0, 1, 2))(q, k, v)


def test_splash_attention_forward_and_backward_lower_for_tpu():
    names = _kernel_calls("tpu", _lower("tpu", _splash_value_and_grad, *SPLASH_ARGS))
    assert len(names) == 3 and all(name.startswith("splash_mha") for name in names)
    assert [any(part in name for name in names) for part in ("fwd", "dq", "dkv")] == [True] * 3


def _decode_calls(block_size, num_splits, backend):
    """Decode attention's args, its public call with these sizes, and the kernel with them unchecked (num_warps
    and num_stages are read by the GPU wrapper only)."""
    return (
        DECODE_ARGS,
        lambda *a: decode_attention(*a, block_size=block_size, num_splits=num_splits),
        lambda *a: decode_attention_pallas(*a, scale=0.1, blocks=BlockSizes(block_size, num_splits, 4, 2),
                                           backend=backend, interpret=False),
    )


def _lightning_calls(block_size, backend):
    """As _decode_calls for the Lightning kernel (T 256: enough for the block shapes to be checked)."""
    return (
        _lightning_args(BF16, T=256),
        lambda q, k, v, s: lightning_attention(q, k, v, LIGHTNING_DECAY, initial_state_BHDE=s,
                                               implementation="pallas", block_size=block_size),
        lambda q, k, v, s: lightning_kernel.pallas_attention(q, k, v, LIGHTNING_DECAY, s, block_size=block_size,
                                                             backend=backend, interpret=False),
    )


# Negative controls: (target, args, the public call with a block the backend rejects, the kernel itself with that
# block and no decodelab check, what Pallas says when lowering it). 683 splits of 12 positions make Mosaic see
# (12, 128) K/V blocks.
REJECTED_BLOCKS = {
    "decode attention, Triton": ("cuda", *_decode_calls(24, 8, "gpu"), "power of 2"),
    "decode attention, Mosaic": ("tpu", *_decode_calls(12, 683, "tpu"), "divisible by 8"),
    "lightning attention, Triton": ("cuda", *_lightning_calls(24, "gpu"), "power of 2"),
    "lightning attention, Mosaic": ("tpu", *_lightning_calls(12, "tpu"), "divisible by 8"),
}


@pytest.mark.parametrize("case", REJECTED_BLOCKS)
def test_a_block_the_backend_rejects_is_refused_first_by_a_one_line_check(case):
    platform, args, public, unchecked, backend_says = REJECTED_BLOCKS[case]
    with pytest.raises(ValueError, match=backend_says) as backend_error:
        _lower(platform, unchecked, *args)
    assert not isinstance(backend_error.value, InputError)
    with pytest.raises(InputError, match=r"block_size=(24|12)") as ours:
        _lower(platform, public, *args)
    assert "\n" not in str(ours.value)


@pytest.mark.parametrize(
    "platform,call,args,match",
    [
        # Lowering accepts the old default decode tile; only Triton's compilation would find it needs 256 KiB.
        ("cuda", lambda *a: decode_attention(*a, block_size=256), DECODE_ARGS, r"needs 256 KiB of shared memory"),
        ("cuda", lambda *a: splash_attention(*a), SPLASH_ARGS, r"compiles for TPU only"),
    ],
)
def test_what_only_compilation_would_reject_is_refused_when_lowering(platform, call, args, match):
    with pytest.raises(InputError, match=match) as info:
        _lower(platform, call, *args)
    assert "\n" not in str(info.value)


def _equations(jaxpr):
    """Every equation of a jaxpr and, recursively, of the jaxprs in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (Jaxpr, ClosedJaxpr)):
                    yield from _equations(sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub)


OUR_KERNELS = {
    "decode attention": (decode_attention, DECODE_ARGS, 1),
    "low-rank decode attention": (low_rank_decode_attention, LOW_RANK_DECODE_ARGS, 1),
    "lightning forward and backward": (_lightning_value_and_grad, _lightning_args(BF16), {"cuda": 2, "tpu": 3}),
    "lightning decode step": (_lightning_decode, DECODE_STEP_ARGS, 1),
}


def _kernel_equations(platform, kernel):
    fn, args, count = OUR_KERNELS[kernel]
    with _target(platform):
        calls = [eqn for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr) if eqn.primitive.name == "pallas_call"]
    assert len(calls) == (count[platform] if isinstance(count, dict) else count)
    return calls


@pytest.mark.parametrize("kernel", OUR_KERNELS)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_every_pallas_call_has_a_name_and_a_cost_estimate(platform, kernel):
    for call in _kernel_equations(platform, kernel):
        cost = call.params["cost_estimate"]
        assert call.params["name"] and cost is not None, call.params["name"]
        assert cost.flops > 0 and cost.bytes_accessed > 0


# Primitives the TPU's scalar core cannot evaluate (it has no transcendental unit).
TRANSCENDENTALS = {"exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "pow", "rsqrt",
                   "sqrt", "erf", "erf_inv", "atan2"}


@pytest.mark.parametrize("kernel", OUR_KERNELS)
def test_tpu_kernels_compute_no_scalar_transcendental(kernel):
    for call in _kernel_equations("tpu", kernel):
        for eqn in _equations(call.params["jaxpr"]):
            if eqn.primitive.name in TRANSCENDENTALS:
                assert any(v.aval.ndim for v in eqn.invars), (call.params["name"], str(eqn))
