"""models/diffusion_head.py: MAR's SimpleMLPAdaLN against a numpy transcription, its zero-initialised modulation and
output, and the logical names on every parameter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.diffusion_head import FREQUENCY_DIM, DiffusionHead

C, W, D, N = 6, 16, 8, 5


def init(num_blocks=2):
    head = DiffusionHead(token_dim=C, width=W, num_blocks=num_blocks)
    inputs = (jnp.ones((N, C)), jnp.arange(N), jnp.ones((N, D)))
    return head, head.init(jax.random.key(0), *inputs)["params"], inputs


def numpy_head(p, x, t, z, num_blocks):
    """SimpleMLPAdaLN.forward (LTH14/mar models/diffloss.py) in float64."""
    dense = lambda q, v: v @ np.asarray(q["Dense_0"]["kernel"], np.float64) + np.asarray(q["Dense_0"]["bias"])
    silu = lambda v: v / (1 + np.exp(-v))

    def layer_norm(v, q=None):
        v = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)
        return v if q is None else v * np.asarray(q["scale"]) + np.asarray(q["bias"])

    half = FREQUENCY_DIM // 2
    freqs = np.exp(-np.log(10_000) * np.arange(half) / half)
    args = t[:, None].astype(np.float64) * freqs[None]
    y = dense(p["time_out"], silu(dense(p["time_in"], np.concatenate([np.cos(args), np.sin(args)], -1))))
    y = y + dense(p["condition"], z)
    x = dense(p["input"], x)
    for i in range(num_blocks):
        q = p[f"block_{i}"]
        shift, scale, gate = np.split(dense(q["modulation"], silu(y)), 3, -1)
        h = layer_norm(x, q["norm"]) * (1 + scale) + shift
        x = x + gate * dense(q["mlp_out"], silu(dense(q["mlp_in"], h)))
    shift, scale = np.split(dense(p["final_modulation"], silu(y)), 2, -1)
    return dense(p["output"], layer_norm(x) * (1 + scale) + shift)


def test_forward_matches_numpy_with_random_parameters():
    head, params, _ = init()
    params = nn.meta.unbox(params)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    rng = np.random.default_rng(0)
    x, z, t = rng.normal(size=(N, C)), rng.normal(size=(N, D)), np.array([0, 1, 17, 500, 999])
    got = head.apply({"params": params}, jnp.asarray(x, jnp.float32), jnp.asarray(t), jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(got, numpy_head(jax.tree.map(np.asarray, params), x, t, z, 2), rtol=1e-4, atol=1e-4)


def test_fresh_head_outputs_zero_yet_learns():
    head, params, inputs = init()
    params = nn.meta.unbox(params)
    assert not np.any(head.apply({"params": params}, *inputs))
    for name in ("final_modulation", "output"):
        assert not np.any(params[name]["Dense_0"]["kernel"])
    assert not np.any(params["block_0"]["modulation"]["Dense_0"]["kernel"])
    assert np.any(params["block_0"]["mlp_in"]["Dense_0"]["kernel"])
    grads = jax.grad(lambda p: jnp.sum(head.apply({"params": p}, *inputs) * jnp.arange(C)[None]))(params)
    assert np.any(grads["output"]["Dense_0"]["kernel"])  # the zero output layer is where learning starts


def test_every_parameter_has_logical_names():
    _, params, _ = init(num_blocks=1)
    boxed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
    assert ("embed", "head_mlp") in {tuple(x.names) for x in boxed}
