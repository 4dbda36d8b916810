"""Joining a multi-process run (a TPU pod, several GPU hosts, or processes on localhost)."""

import jax
import ml_collections


def initialize(distributed_config: ml_collections.ConfigDict) -> None:
    """Calls jax.distributed.initialize when configured; on Cloud TPU every argument is detected."""
    if not distributed_config.initialize:
        return
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if distributed_config.coordinator_address:
        kwargs = dict(coordinator_address=distributed_config.coordinator_address,
                      num_processes=distributed_config.num_processes, process_id=distributed_config.process_id)
    jax.distributed.initialize(**kwargs)
