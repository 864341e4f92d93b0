"""Splitting the corpus into data-parallel shards, and cutting a shard into resumable batches.

Ray Train splits datasets by world rank, but the stages of one pipeline replica must all see the
same batch (the first stage reads inputs, the last reads targets). So we split by data-parallel
rank: world rank r is pipeline stage r // dp and replica r % dp, DeepSpeed's pipe-major topology.

The split runs on the driver before the workers start: splitting blocks takes Ray tasks of one
CPU each, which a cluster whose CPUs the workers (or other sweep trials) hold could never run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ray.train import DataConfig

if TYPE_CHECKING:
    import ray.data

    from shipyard.data.corpus import Corpus


@dataclass(frozen=True)
class CorpusShards:
    """A corpus split into `len(train)` equal, ordered shards per split."""

    corpus: Corpus
    train: tuple[ray.data.Dataset, ...]
    validation: tuple[ray.data.Dataset, ...]

    @property
    def data_parallel_size(self) -> int:
        """How many model replicas the shards are for."""
        return len(self.train)

    def datasets(self) -> dict[str, ray.data.Dataset]:
        """The unsplit splits, as the trainer's `datasets` (DataParallelShards hands out shards)."""
        return {"train": self.corpus.train, "validation": self.corpus.validation}


def shard_corpus(corpus: Corpus, data_parallel_size: int) -> CorpusShards:
    """Split both splits of `corpus` into equal shards, one per data-parallel replica."""
    # A materialized dataset splits the same way every time; streaming splits need not.
    return CorpusShards(
        corpus=corpus,
        train=tuple(corpus.train.split(data_parallel_size, equal=True)),
        validation=tuple(corpus.validation.split(data_parallel_size, equal=True)),
    )


class DataParallelShards(DataConfig):
    """Gives world rank r the shards of data-parallel rank r % dp, split beforehand."""

    def __init__(self, shards: CorpusShards):
        super().__init__()
        self.shards = shards

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        # Ray Train asks for one split at a time, by name ('train' or 'validation').
        replicas = self.shards.data_parallel_size
        return [
            {name: getattr(self.shards, name)[rank % replicas].iterator() for name in datasets}
            for rank in range(world_size)
        ]


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
