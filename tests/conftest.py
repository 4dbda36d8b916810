"""Every test sees 8 fake CPU devices, set before jax is imported, so sharding tests run on a 2x4 mesh; implicit
rank promotion (a silent broadcast of a missing axis) is an error, as in nanodo.

Tests that use torch and transformers as references carry the `torch` marker. The Python 3.12 environment has
neither (torch==2.13.0 is a multi-GB CUDA build there) and runs with -m "not torch"; files that import torch at
module level are then not collected at all, since importing them would fail.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; jax was imported before conftest set XLA_FLAGS"

jax.config.update("jax_numpy_rank_promotion", "raise")

TORCH_FILES = ("test_gguf.py", "test_hf_interop.py")


def _torch_deselected(config):
    return "not torch" in (config.getoption("markexpr") or "")


def pytest_ignore_collect(collection_path, config):
    if collection_path.name in TORCH_FILES and _torch_deselected(config):
        return True
    return None


@pytest.hookimpl(tryfirst=True)  # before the -m deselection reads the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in TORCH_FILES:
            item.add_marker(pytest.mark.torch)
