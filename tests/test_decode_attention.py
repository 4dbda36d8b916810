"""Decode attention: the Pallas kernel (interpret mode, both GPU and TPU wrappers) against the plain-jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import InputError
from pallas_kernels.decode_attention import BlockSizes, decode_attention, decode_attention_pallas

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
    """Either wrapper in interpret mode (the dispatcher picks the GPU one on CPU)."""
    batch, kv_heads, cache_len, head_dim = k_BKSH.shape
    blocks = BlockSizes(block_size, num_splits).resolve(
        backend, compiled=False, programs=batch * kv_heads, cache_len=cache_len, head_dim=head_dim,
        itemsize=k_BKSH.dtype.itemsize,
    )
    return decode_attention_pallas(
        q_BNH, k_BKSH, v_BKSH, lengths_B, scale=head_dim**-0.5, blocks=blocks, backend=backend, interpret=True
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
    # Defaults: implementation="pallas", the GPU block (capped to the cache), interpret on CPU, traced lengths.
    q_BNH, k_BKSH, v_BKSH, lengths_B = _inputs(_ragged(24), 2, 2, 24, 16)
    o_BNH = jax.jit(decode_attention)(q_BNH, k_BKSH, v_BKSH, lengths_B)
    ref_BNH = decode_attention(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation="reference")
    np.testing.assert_allclose(o_BNH, ref_BNH, atol=FP32_TOL, rtol=FP32_TOL)


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
        (_bad(), {"block_size": 20}, r"block_size=20; expected a multiple of 8"),
        (_bad(), {"num_splits": 0}, r"num_splits=0"),
        (_bad(), {"num_warps": -4}, r"num_warps=-4"),
        (_bad(), {"num_stages": 1.5}, r"num_stages=1.5"),
        (_bad(), {"implementation": "cudnn"}, r"implementation='cudnn'"),
        (_bad(), {"interpret": False}, r"interpret=False needs a GPU or TPU"),
    ],
)
def test_bad_inputs_raise_one_line_input_error(args, kwargs, match):
    with pytest.raises(InputError, match=match) as info:
        decode_attention(**args, **kwargs)
    assert "\n" not in str(info.value)


def _resolve(backend, *, compiled=True, head_dim=128, itemsize=2, cache_len=8192, programs=64, **requested):
    return BlockSizes(**requested).resolve(
        backend, compiled=compiled, programs=programs, cache_len=cache_len, head_dim=head_dim, itemsize=itemsize
    )


def test_block_size_defaults_per_backend():
    # GPU: JAX's decode tiling (block 128, 4 warps, 2 stages) for bf16 at head_dim 128; float32 K/V buffers are
    # twice as large, so the block halves to keep them at 128 KiB. 64 programs -> 264 / 64 = 5 splits.
    assert _resolve("gpu") == BlockSizes(block_size=128, num_splits=5, num_warps=4, num_stages=2)
    assert _resolve("gpu", itemsize=4).block_size == 64
    assert _resolve("gpu", head_dim=64, itemsize=4).block_size == 128
    # TPU: lane-dense 256-position steps, splits of at most 2048 positions; no Triton parameters.
    assert _resolve("tpu") == BlockSizes(block_size=256, num_splits=4, num_warps=None, num_stages=None)
    # A short cache caps the block (a power of two on GPU, a multiple of 8 on TPU).
    assert _resolve("gpu", cache_len=37).block_size == 64
    assert _resolve("tpu", cache_len=37).block_size == 40


def test_block_sizes_resolve_num_splits_exactly():
    # 8192 / 128 = 64 blocks in 5 requested splits -> 13 blocks per split -> 5 splits, the last with 12.
    blocks = _resolve("gpu", num_splits=5)
    assert (blocks.num_splits, blocks.split_blocks(8192)) == (5, 13)
    # More splits than blocks: one block each.
    blocks = _resolve("gpu", cache_len=256, num_splits=100)
    assert (blocks.num_splits, blocks.split_blocks(256)) == (2, 1)


@pytest.mark.parametrize(
    "backend,call,match",
    [
        # The old default tile: 2 stages * (K + V) * 256 * 128 * 2 bytes = 256 KiB > 227 KiB.
        ("gpu", dict(block_size=256), r"block_size=256 with num_stages=2 needs 256 KiB .* 227 KiB"),
        ("gpu", dict(block_size=128, num_stages=4), r"block_size=128 with num_stages=4 needs 256 KiB"),
        ("gpu", dict(block_size=128, itemsize=4), r"block_size=128 with num_stages=2 needs 256 KiB"),
        # One split of a 32768-position bf16 cache: 2 (K, V) * 2 buffers * 32768 * 128 * 2 bytes = 32 MiB.
        ("tpu", dict(num_splits=1, cache_len=32768), r"num_splits=1 gives splits of 32768 positions .* 32768 KiB"),
        ("gpu", dict(block_size=24), r"block_size=24; expected a power of two >= 16 on GPU \(Triton\)"),
        ("gpu", dict(num_warps=3), r"num_warps=3; expected a power of two on GPU"),
        ("tpu", dict(block_size=12), r"block_size=12; expected a multiple of 8 \(TPU sublanes\)"),
    ],
)
def test_tiles_over_the_backend_memory_are_refused(backend, call, match):
    with pytest.raises(InputError, match=match) as info:
        _resolve(backend, **call)
    assert "\n" not in str(info.value)


def test_tiles_within_the_backend_memory_resolve():
    assert _resolve("gpu", block_size=128, num_stages=3).num_stages == 3  # 192 KiB
    assert _resolve("tpu", num_splits=1).num_splits == 1  # 8192 positions in bf16: 16 MiB


def test_interpret_mode_needs_only_multiples_of_8():
    # What only Triton or a GPU's shared memory would refuse runs interpreted (e.g. on CPU, where tests use it).
    assert _resolve("gpu", compiled=False, block_size=24).block_size == 24
    assert _resolve("gpu", compiled=False, block_size=256).block_size == 256
    assert _resolve("tpu", compiled=False, num_splits=1, cache_len=32768).num_splits == 1
