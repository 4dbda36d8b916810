"""Which Pallas lowering a kernel call targets and whether it runs in interpret mode: the one place both are chosen
(and the padding the GPU wrappers share).

The target is the platform of the abstract device when the call is traced under `jax.sharding.use_abstract_mesh`
(how code is lowered for a GPU or TPU that is not attached: `jax.jit(f).trace(...).lower(lowering_platforms=...)`),
else that of the default backend. A CPU target runs the GPU-shaped wrapper in interpret mode.
"""

import jax
from jax.experimental import pallas as pl

from errors import InputError

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def target_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform the enclosing trace is lowered for."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = jax.default_backend() if device is None else device.platform
    return "gpu" if platform in _GPU_PLATFORMS else platform


def kernel_backend(interpret, *, caller: str) -> tuple[str, bool]:
    """(wrapper, interpret) for a kernel call: wrapper "gpu" (Triton) or "tpu" (Mosaic); interpret=None means
    interpret exactly when the target is the CPU. `caller` names the function in the error message."""
    platform = target_platform()
    interpret = platform == "cpu" if interpret is None else bool(interpret)
    if platform == "cpu" and not interpret:
        raise InputError(
            f"{caller}: interpret=False needs a GPU or TPU target; on CPU Pallas kernels run only with interpret=True"
        )
    return ("tpu" if platform == "tpu" else "gpu"), interpret


def triton_width(n: int) -> int:
    """A dimension as the GPU wrappers pad it: Triton tensors need power-of-two sizes, and tl.dot >= 16 per dim."""
    return max(16, pl.next_power_of_2(n))
