"""Training metrics to WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard event files.

Only process 0 writes. A resumed run appends, so a step logged before an interruption may appear twice; the
later line is the one that counts.
"""

import json
import os

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str):
        self._enabled = jax.process_index() == 0
        if self._enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()
