"""Every test sees 8 fake CPU devices, set before jax is imported, so sharding tests run on a 2x4 mesh; implicit
rank promotion (a silent broadcast of a missing axis) is an error, as in nanodo."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; jax was imported before conftest set XLA_FLAGS"

jax.config.update("jax_numpy_rank_promotion", "raise")
