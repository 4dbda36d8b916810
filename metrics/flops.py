"""Model FLOPs per token and the peak FLOP/s of the accelerator, for the MFU estimate."""

import jax

# Dense bf16 peak per chip, from the vendors' spec sheets.
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def training_flops_per_token(num_params: int, lookup_only_params: int, num_layers: int, attention_dim: int,
                             seq_len: int) -> float:
    """6 N per token for the matmuls (forward + backward; an untied input embedding is a lookup, not a matmul)
    plus causal attention's 6 * L * T * D (QK^T and AV, forward and backward, half the square)."""
    return 6 * (num_params - lookup_only_params) + 6 * num_layers * seq_len * attention_dim


def peak_flops_per_device(override: float = 0.0) -> float | None:
    """`override` if set, else the table's entry for this device kind; None where unknown (e.g. CPU)."""
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name.lower() in kind.lower()), None)
