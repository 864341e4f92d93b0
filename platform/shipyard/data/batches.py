"""One global batch order for every layout: each replica trains on its slice of it.

Every rank reads the whole (materialized) corpus and draws the same global micro-batches, of
`sum(replica_micro_batches)` windows, in an order that depends only on the seed and the step.
Data-parallel replica r takes the r-th slice, as many windows as the plan gives it, so an uneven
split (a fast GPU taking more) trains on exactly the samples an even split would; the stages of
one pipeline replica read the same slice. Nothing is split by Ray Data tasks, which a cluster
whose CPUs the workers hold could not run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def replica_slices(micro_batches: tuple[int, ...]) -> list[slice]:
    """Where each replica's windows sit in a global micro-batch."""
    ends = np.cumsum(micro_batches).tolist()
    return [slice(end - size, end) for size, end in zip(micro_batches, ends, strict=True)]


def load_windows(dataset_shard: Any) -> np.ndarray:
    """All token windows of a split, in order, as one (windows, length) array."""
    parts = [batch["tokens"] for batch in dataset_shard.iter_batches(batch_format="numpy")]
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
