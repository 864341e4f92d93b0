"""What Ray Train's controller unpickles from the driver: the ranks' entry point and the
callback that forwards metrics.

The controller imports the modules these live in. Kept here, away from the training loop,
they cost it neither DeepSpeed nor Shipyard's models (about 3 s of a core at every run's
start); each rank imports the loop itself when it starts.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ray.train import UserCallback

from shipyard.storage import from_ray_storage


def train_loop(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker; `config` is plain data from the driver."""
    with hidden_module("mlflow"):
        from shipyard.train.worker import run_rank

    run_rank(config)


@contextmanager
def hidden_module(name: str) -> Iterator[None]:
    """Imports of `name` fail (ImportError) inside the block, unless it is already imported.

    DeepSpeed's autotuner imports MLflow when it is installed, to log autotuning runs, which
    Shipyard never starts: about 1 s of a core in every rank of every run. Ranks record
    nothing to MLflow themselves (the driver does), so they import DeepSpeed without it."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # Python's documented way to make an import raise ImportError
    try:
        yield
    finally:
        if sys.modules.get(name, False) is None:
            del sys.modules[name]


class ForwardMetrics(UserCallback):
    """Runs in the Train controller: forwards rank 0's metrics to the driver for live progress."""

    def __init__(self, metrics_queue):
        self.metrics_queue = metrics_queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        row = dict(metrics[0])
        if checkpoint is not None:  # named as Shipyard names it (Ray drops s3:// on S3)
            row["checkpoint"] = from_ray_storage(checkpoint.path, checkpoint.filesystem)
        self.metrics_queue.put(row)
