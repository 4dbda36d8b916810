"""The whole model's train step and decode step with the Pallas implementations selected, lowered for CUDA (Triton)
and TPU (Mosaic) with neither attached (see tests/test_kernel_lowering.py for how): every kernel the layers call is
in the module as the backend's custom call. A hybrid of the configs/lightning.py:small shape: lightning layers with the
Pallas forward, backward and decode step, and softmax layers with the flash-decoding kernel and, on TPU, splash
attention for training."""

import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

import train
from configs import lightning
from models import registry
from parallel import mesh as mesh_lib

TARGETS = {
    "cuda": AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
    "tpu": AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
}
# The kernel's name as each backend's custom call records it.
KERNEL_NAME = {"cuda": r'custom_call @__gpu\$xla\.gpu\.triton\(.*name = "(\w+)", num_stages',
               "tpu": r'custom_call @tpu_custom_call\(.*kernel_name = "(\w+)"'}
# cuDNN attention cannot be traced without a GPU's cuDNN, so the CUDA train step keeps XLA softmax attention.
TRAINING_SOFTMAX = {"cuda": "xla", "tpu": "splash"}


def _config(platform: str):
    config = lightning.get_config("small")
    config.model.update(num_layers=4, mixer_pattern="lightning,softmax", softmax_implementation="pallas",
                        lightning_implementation="pallas", lightning_decode_implementation="pallas")
    config.data.update(global_batch_size=8, seq_len=1024)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


@contextlib.contextmanager
def _target(platform, config):
    """An abstract one-device mesh of `platform` with decodelab's axes, and the config's logical rules."""
    mesh = AbstractMesh((1, 1, 1), mesh_lib.AXES, axis_types=(AxisType.Auto,) * 3, abstract_device=TARGETS[platform])
    with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(mesh_lib.axis_rules(config)):
        yield


def _kernels(platform, fn, *args) -> set[str]:
    """The names of the Pallas kernels in fn's module lowered for `platform`."""
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return set(re.findall(KERNEL_NAME[platform], text))


@pytest.mark.parametrize("platform", sorted(TARGETS))
def test_train_step_lowers_with_the_kernels(platform):
    config = _config(platform)
    config.model.softmax_implementation = TRAINING_SOFTMAX[platform]
    model = registry.build(config.model)
    optimizer, schedule = train.make_optimizer(config)
    state = jax.eval_shape(lambda: nn.meta.unbox(train.make_init_state(model, optimizer, config.data.seq_len)(
        jax.random.key(0))))
    batch = {"tokens": jax.ShapeDtypeStruct((config.data.global_batch_size, config.data.seq_len + 1), jnp.int32)}
    with _target(platform, config):
        kernels = _kernels(platform, train.make_train_step(model, optimizer, schedule, config.seed), state, batch)
    expected = {"cuda": {"lightning_attention_fwd", "lightning_attention_bwd"},
                "tpu": {"lightning_attention_fwd", "lightning_attention_bwd_dq", "lightning_attention_bwd_dkdv",
                        "splash_mha_fwd_residuals", "splash_mha_dq_no_residuals", "splash_mha_dkv_no_residuals"}}
    assert kernels == expected[platform]


@pytest.mark.parametrize("platform", sorted(TARGETS))
def test_decode_step_lowers_with_the_kernels(platform):
    config = _config(platform)
    model = registry.build(config.model)
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *model.example_inputs())["params"]))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16 if x.ndim >= 2 else x.dtype), params)
    cache = jax.eval_shape(lambda: model.init_cache(8, 8192))

    def decode_step(params, tokens_B1, cache):
        return model.apply({"params": params}, tokens_B1, cache)

    with _target(platform, config):
        kernels = _kernels(platform, decode_step, params, jax.ShapeDtypeStruct((8, 1), jnp.int32), cache)
    assert kernels == {"decode_attention_partials", "lightning_attention_decode"}
