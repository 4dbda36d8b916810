"""The peak FLOP/s of the accelerator, for the MFU estimate (a model gives its own FLOPs per token)."""

import jax

# Dense bf16 peak per chip, from the vendors' spec sheets.
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
    """`override` if set, else the table's entry for this device kind; None where unknown (e.g. CPU)."""
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name.lower() in kind.lower()), None)
