"""Handing each worker its data-parallel shard, and cutting it into resumable micro-batches.

Ray Train splits datasets by world rank, but the stages of one pipeline replica must all see the
same batch (the first stage reads inputs, the last reads targets). So we split by data-parallel
rank: world rank r is pipeline stage r // dp and replica r % dp, DeepSpeed's pipe-major topology.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ray.train import DataConfig


class DataParallelShards(DataConfig):
    """Gives world rank r the shard of data-parallel rank r % dp, split in a fixed order."""

    def __init__(self, data_parallel_size: int):
        super().__init__()
        self.data_parallel_size = data_parallel_size

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            # A materialized dataset splits the same way every time; streaming splits need not.
            shards = dataset.split(self.data_parallel_size, equal=True)
            for rank in range(world_size):
                output[rank][name] = shards[rank % self.data_parallel_size].iterator()
        return output


def load_shard(shard: Any) -> np.ndarray:
    """All token windows of this worker's shard, in order, as one (windows, length) array."""
    parts = [batch["tokens"] for batch in shard.iter_batches(batch_format="numpy")]
    return np.concatenate(parts) if parts else np.empty((0, 0), np.uint8)


def training_batches(
    windows: np.ndarray, batch_size: int, seed: int, skip: int = 0
) -> Iterator[torch.Tensor]:
    """Micro-batches forever, reshuffled each epoch by (seed, epoch); `skip` resumes mid-stream.

    The stream depends only on its arguments, so a resumed run sees exactly the batches the
    uninterrupted run would have seen.
    """
    per_epoch = len(windows) // batch_size
    epoch, position = divmod(skip, per_epoch)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(windows))
        for index in range(position, per_epoch):
            chosen = order[index * batch_size : (index + 1) * batch_size]
            yield torch.from_numpy(windows[chosen].astype(np.int64))
        epoch, position = epoch + 1, 0


def evaluation_batches(windows: np.ndarray, batch_size: int, count: int) -> list[torch.Tensor]:
    """The same first `count` validation micro-batches every time (wrapping if the set is small)."""
    indices = np.arange(count * batch_size) % len(windows)
    return [
        torch.from_numpy(windows[indices[i * batch_size : (i + 1) * batch_size]].astype(np.int64))
        for i in range(count)
    ]
