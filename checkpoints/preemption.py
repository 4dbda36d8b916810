"""Noticing a preemption (SIGTERM from a TPU maintenance event or a cluster scheduler) at a step boundary."""

import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """`reached(step)` is True once a preemption was signalled, on every host at the same step."""

    def __init__(self):
        self._signalled = False
        # Multi-process runs: jax.distributed's coordination service catches SIGTERM and agrees on a step.
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self._signalled = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled

    def close(self) -> None:
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._previous)
