"""Decode attention: the Pallas kernel (interpret mode, both GPU and TPU wrappers) against the plain-jnp reference."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import export

from errors import InputError
from pallas_kernels.decode_attention import decode_attention, decode_attention_pallas

# fp32: XLA:CPU interpret is exact fp32 and the kernel asks for IEEE matmuls; only summation order differs.
FP32_TOL = 1e-5
# bf16: the kernel feeds probabilities to the PV matmul in bf16 (as on GPU/TPU) and both outputs round to bf16.
BF16_TOL = 1e-2


def _inputs(batch_lengths, kv_heads, group, cache_len, head_dim, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    batch = len(batch_lengths)
    q_BNH = jnp.asarray(rng.standard_normal((batch, kv_heads * group, head_dim)), dtype)
    k_BKSH = jnp.asarray(rng.standard_normal((batch, kv_heads, cache_len, head_dim)), dtype)
    v_BKSH = jnp.asarray(rng.standard_normal((batch, kv_heads, cache_len, head_dim)), dtype)
    return q_BNH, k_BKSH, v_BKSH, jnp.asarray(batch_lengths, jnp.int32)


def _ragged(cache_len):
    """Empty, one position, a partial last block, and the full cache."""
    return [0, 1, cache_len // 2 + 3, cache_len]


def _pallas(q_BNH, k_BKSH, v_BKSH, lengths_B, *, backend, block_size, num_splits=None):
    scale = q_BNH.shape[-1] ** -0.5
    return decode_attention_pallas(
        q_BNH, k_BKSH, v_BKSH, lengths_B,
        scale=scale, block_size=block_size, num_splits=num_splits, backend=backend, interpret=True,
    )


# (backend, group, head_dim, cache_len, block_size): GQA 1/2/4, odd head_dim 40, cache_len not a block multiple.
CASES = [
    ("gpu", 1, 16, 64, 16),
    ("gpu", 2, 40, 50, 16),
    ("gpu", 4, 32, 37, 8),
    ("tpu", 2, 40, 50, 16),
    pytest.param("tpu", 4, 32, 37, 8, marks=pytest.mark.slow),
]


def test_reference_matches_numpy_softmax_per_sequence():
    q_BNH, k_BKSH, v_BKSH, lengths_B = _inputs(_ragged(11), kv_heads=2, group=3, cache_len=11, head_dim=5)
    o_BNH = np.asarray(decode_attention(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation="reference", scale=0.7))
    q, k, v = (np.asarray(x, np.float64) for x in (q_BNH, k_BKSH, v_BKSH))
    for b, length in enumerate(np.asarray(lengths_B)):
        for n in range(q.shape[1]):
            if length == 0:
                np.testing.assert_array_equal(o_BNH[b, n], 0.0)
                continue
            s = k[b, n // 3, :length] @ q[b, n] * 0.7
            p = np.exp(s - s.max())
            np.testing.assert_allclose(o_BNH[b, n], p @ v[b, n // 3, :length] / p.sum(), atol=1e-5)


@pytest.mark.parametrize("backend,group,head_dim,cache_len,block_size", CASES)
def test_pallas_matches_reference_fp32(backend, group, head_dim, cache_len, block_size):
    q_BNH, k_BKSH, v_BKSH, lengths_B = _inputs(_ragged(cache_len), 2, group, cache_len, head_dim)
    o_BNH = _pallas(q_BNH, k_BKSH, v_BKSH, lengths_B, backend=backend, block_size=block_size)
    ref_BNH = decode_attention(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation="reference")
    assert o_BNH.shape == q_BNH.shape and o_BNH.dtype == jnp.float32
    np.testing.assert_allclose(o_BNH, ref_BNH, atol=FP32_TOL, rtol=FP32_TOL)
    np.testing.assert_array_equal(o_BNH[0], 0.0)


def test_pallas_matches_reference_bf16():
    q_BNH, k_BKSH, v_BKSH, lengths_B = _inputs(_ragged(50), 2, 2, 50, 40, dtype=jnp.bfloat16)
    o_BNH = _pallas(q_BNH, k_BKSH, v_BKSH, lengths_B, backend="gpu", block_size=16)
    ref_BNH = decode_attention(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation="reference")
    assert o_BNH.dtype == jnp.bfloat16
    np.testing.assert_allclose(o_BNH.astype(jnp.float32), ref_BNH.astype(jnp.float32), atol=BF16_TOL, rtol=BF16_TOL)


def test_num_splits_do_not_change_the_answer():
    # 50 positions in blocks of 16 = 4 blocks: 1 split, 3 splits (2 + 2 blocks, last split partial), 4 splits.
    q_BNH, k_BKSH, v_BKSH, lengths_B = _inputs(_ragged(50), 2, 2, 50, 40)
    one, three, default = (
        _pallas(q_BNH, k_BKSH, v_BKSH, lengths_B, backend="gpu", block_size=16, num_splits=n) for n in (1, 3, None)
    )
    np.testing.assert_allclose(three, one, atol=FP32_TOL, rtol=FP32_TOL)
    np.testing.assert_allclose(default, one, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("fill", [np.nan, 1e30])
@pytest.mark.parametrize("implementation", ["reference", "gpu", "tpu"])
def test_cache_past_length_has_no_influence(implementation, fill):
    # Same shapes and block sizes as CASES, so the kernels come from the jit cache.
    q_BNH, k_BKSH, v_BKSH, lengths_B = _inputs(_ragged(50), 2, 2, 50, 40)
    past_B1S1 = (jnp.arange(50)[None, :] >= lengths_B[:, None])[:, None, :, None]
    dirty_k, dirty_v = jnp.where(past_B1S1, fill, k_BKSH), jnp.where(past_B1S1, fill, v_BKSH)
    if implementation == "reference":
        clean = decode_attention(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation="reference")
        dirty = decode_attention(q_BNH, dirty_k, dirty_v, lengths_B, implementation="reference")
    else:
        clean = _pallas(q_BNH, k_BKSH, v_BKSH, lengths_B, backend=implementation, block_size=16)
        dirty = _pallas(q_BNH, dirty_k, dirty_v, lengths_B, backend=implementation, block_size=16)
    assert np.isfinite(np.asarray(dirty)).all()
    np.testing.assert_array_equal(dirty, clean)


def test_default_dispatch_under_jit():
    # Defaults: implementation="pallas", block_size=256 (capped to the cache), interpret on CPU, traced lengths.
    q_BNH, k_BKSH, v_BKSH, lengths_B = _inputs(_ragged(24), 2, 2, 24, 16)
    o_BNH = jax.jit(decode_attention)(q_BNH, k_BKSH, v_BKSH, lengths_B)
    ref_BNH = decode_attention(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation="reference")
    np.testing.assert_allclose(o_BNH, ref_BNH, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_wrapper_lowers_to_triton(dtype):
    # No GPU here: lowering for CUDA still runs the Triton checks (power-of-two tensors, dot sizes, block specs).
    # Shapes of a 1B Llama decode step: 8 kv heads, group 4, head_dim 64, cache 1000 (not a block multiple).
    args = (
        jax.ShapeDtypeStruct((1, 32, 64), dtype),
        jax.ShapeDtypeStruct((1, 8, 1000, 64), dtype),
        jax.ShapeDtypeStruct((1, 8, 1000, 64), dtype),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    kernel = jax.jit(
        lambda q, k, v, lengths: decode_attention_pallas(
            q, k, v, lengths, scale=0.125, block_size=256, num_splits=None, backend="gpu", interpret=False
        )
    )
    triton_call = "__gpu$xla.gpu.triton"
    allow_triton = [export.DisabledSafetyCheck.custom_call(triton_call)]
    exported = export.export(kernel, platforms=["cuda"], disabled_checks=allow_triton)(*args)
    assert triton_call in exported.mlir_module()


def _bad(**overrides):
    args = dict(
        q_BNH=jnp.zeros((2, 4, 8)), k_BKSH=jnp.zeros((2, 2, 16, 8)), v_BKSH=jnp.zeros((2, 2, 16, 8)),
        lengths_B=jnp.zeros((2,), jnp.int32),
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (_bad(q_BNH=jnp.zeros((2, 4, 8, 1))), {}, r"q_BNH .*\(2, 4, 8, 1\)"),
        (_bad(k_BKSH=jnp.zeros((2, 16, 8))), {}, r"k_BKSH .*\(2, 16, 8\)"),
        (_bad(v_BKSH=jnp.zeros((2, 2, 12, 8))), {}, r"v_BKSH shape \(2, 2, 12, 8\) != k_BKSH"),
        (_bad(k_BKSH=jnp.zeros((2, 2, 0, 8)), v_BKSH=jnp.zeros((2, 2, 0, 8))), {}, r"cache_len 0"),
        (_bad(q_BNH=jnp.zeros((2, 4, 6))), {}, r"\(2, 4, 6\).*\(2, 2, 16, 8\)"),
        (_bad(q_BNH=jnp.zeros((3, 4, 8))), {}, r"\(3, 4, 8\).*\(2, 2, 16, 8\)"),
        (_bad(q_BNH=jnp.zeros((2, 3, 8))), {}, r"num_heads=3 .*kv_heads=2"),
        (_bad(lengths_B=jnp.zeros((2, 1), jnp.int32)), {}, r"lengths_B shape \(2, 1\)"),
        (_bad(), {"block_size": 0}, r"block_size=0"),
        (_bad(), {"block_size": 20}, r"block_size=20"),
        (_bad(), {"num_splits": 0}, r"num_splits=0"),
        (_bad(), {"implementation": "cudnn"}, r"implementation='cudnn'"),
    ],
)
def test_bad_inputs_raise_input_error(args, kwargs, match):
    with pytest.raises(InputError, match=match):
        decode_attention(**args, **kwargs)
