"""Every kernel under jax.shard_map on the 8 fake CPU devices (a 2 x 4 mesh), batch and heads sharded, in interpret
mode: the same answers (and gradients) as the unsharded reference, outputs left sharded, bad shardings refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from errors import InputError
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.lightning_attention import lightning_attention, lightning_decode_step
from pallas_kernels.sharding import KernelSharding
from pallas_kernels.splash_attention import splash_attention

MESH = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
BATCH_AND_HEADS = KernelSharding(batch="data", heads="tensor", mesh=MESH)


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _assert_sharded(x, spec):
    assert x.sharding.is_equivalent_to(NamedSharding(MESH, spec), x.ndim), x.sharding


@pytest.mark.parametrize(
    "sharding,batch",
    [(BATCH_AND_HEADS, 2), (KernelSharding(batch=("data", "tensor"), mesh=MESH), 8)],
    ids=["batch and heads", "batch over both axes"],
)
def test_decode_attention_sharded_equals_reference(sharding, batch):
    # 8 query heads over 4 kv heads: a heads shard holds 2 query heads and their 1 kv head.
    q_BNH, k_BKSH, v_BKSH = _normal(0, (batch, 8, 16)), _normal(1, (batch, 4, 40, 16)), _normal(2, (batch, 4, 40, 16))
    lengths_B = jnp.arange(batch, dtype=jnp.int32) * 5 + 1
    o_BNH = jax.jit(lambda *a: decode_attention(*a, block_size=16, sharding=sharding))(q_BNH, k_BKSH, v_BKSH, lengths_B)
    ref_BNH = decode_attention(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation="reference")
    np.testing.assert_allclose(o_BNH, ref_BNH, atol=1e-5, rtol=1e-5)
    _assert_sharded(o_BNH, P(sharding.batch, sharding.heads))


def test_sharding_takes_the_mesh_set_with_set_mesh():
    q_BNH, k_BKSH, v_BKSH = _normal(0, (2, 4, 16)), _normal(1, (2, 4, 24, 16)), _normal(2, (2, 4, 24, 16))
    lengths_B = jnp.array([24, 7], jnp.int32)
    with jax.set_mesh(MESH):
        o_BNH = jax.jit(lambda *a: decode_attention(*a, sharding=KernelSharding("data", "tensor")))(
            q_BNH, k_BKSH, v_BKSH, lengths_B
        )
    ref_BNH = decode_attention(q_BNH, k_BKSH, v_BKSH, lengths_B, implementation="reference")
    np.testing.assert_allclose(o_BNH, ref_BNH, atol=1e-5, rtol=1e-5)
    _assert_sharded(o_BNH, P("data", "tensor"))


def _outputs_and_grads(fn, *args):
    """fn's outputs and the gradient of a fixed random projection of them, in one jitted call."""
    def loss(*args):
        outputs = fn(*args)
        weights = [_normal(10 + i, o.shape) for i, o in enumerate(outputs)]
        return sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(outputs, weights)), outputs

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return outputs, grads


def test_lightning_attention_sharded_equals_reference_with_gradients():
    decay_H = jnp.array([0.5, 0.9, 0.99, 1.0])
    args = (*(_normal(seed, (2, 37, 4, 16)) for seed in range(3)), _normal(3, (2, 4, 16, 16)))

    def sharded(q, k, v, s):
        return lightning_attention(q, k, v, decay_H, initial_state_BHDE=s, implementation="pallas", block_size=16,
                                   sharding=BATCH_AND_HEADS)

    def reference(q, k, v, s):
        return lightning_attention(q, k, v, decay_H, initial_state_BHDE=s, implementation="reference")

    (o, final), grads = _outputs_and_grads(sharded, *args)
    (o_ref, final_ref), grads_ref = _outputs_and_grads(reference, *args)
    for actual, expected in zip((o, final, *grads), (o_ref, final_ref, *grads_ref)):
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)
    _assert_sharded(o, P("data", None, "tensor"))
    _assert_sharded(final, P("data", "tensor"))


def test_lightning_decode_step_sharded_equals_jnp():
    decay_H = jnp.array([0.5, 0.9, 0.99, 1.0])
    args = (_normal(0, (2, 4, 16)), _normal(1, (2, 4, 16)), _normal(2, (2, 4, 32)), _normal(3, (2, 4, 16, 32)))
    o, state = jax.jit(lambda *a: lightning_decode_step(*a[:3], decay_H, a[3], implementation="pallas",
                                                        sharding=BATCH_AND_HEADS))(*args)
    o_ref, state_ref = lightning_decode_step(*args[:3], decay_H, args[3])
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(state, state_ref, atol=1e-5, rtol=1e-5)
    _assert_sharded(state, P("data", "tensor"))


def test_splash_attention_sharded_equals_reference_with_gradients():
    args = (_normal(0, (2, 128, 8, 32)), _normal(1, (2, 128, 4, 32)), _normal(2, (2, 128, 4, 32)))
    (o,), grads = _outputs_and_grads(lambda *a: (splash_attention(*a, sharding=BATCH_AND_HEADS),), *args)
    (o_ref,), grads_ref = _outputs_and_grads(lambda *a: (splash_attention(*a, implementation="reference"),), *args)
    for actual, expected in zip((o, *grads), (o_ref, *grads_ref)):
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)
    _assert_sharded(o, P("data", None, "tensor"))


@pytest.mark.parametrize(
    "sharding,kv_heads,match",
    [
        (KernelSharding(batch="model", mesh=MESH), 4, r"axis 'model' is not in the mesh axes \('data', 'tensor'\)"),
        (KernelSharding(heads="tensor"), 4, r"sharding axis 'tensor' is not in the mesh axes \(\)"),
        (BATCH_AND_HEADS, 2, r"k_BKSH shape \(2, 2, 8, 16\) dim 1 is not divisible by the 4 shards of mesh axes"),
    ],
)
def test_bad_sharding_raises_one_line_input_error(sharding, kv_heads, match):
    q_BNH, k_BKSH = jnp.zeros((2, 4, 16)), jnp.zeros((2, kv_heads, 8, 16))
    with pytest.raises(InputError, match=match) as info:
        decode_attention(q_BNH, k_BKSH, k_BKSH, jnp.zeros((2,), jnp.int32), sharding=sharding)
    assert "\n" not in str(info.value)
