"""One global batch order for every layout, read as a stream from the packed token files.

A split is one file of token ids: the documents, each followed by the tokenizer's end-of-text
token, packed end to end. Window i is tokens [i·L, i·L + L + 1) for a sequence length L (inputs
and the shifted targets). Every rank draws the same global micro-batches of window indices, in
an order that depends only on the seed, the epoch and the position, and reads only the windows
of its replica's slice, from disk: a worker's memory does not grow with the corpus, and a run
restarted at step s reads exactly the batches the uninterrupted run read after step s.

The order is a seeded bijection of [0, windows) (a Feistel network, cycle-walked into range), so
it needs no permutation array. Data-parallel replica r takes the r-th slice of each global
micro-batch, as many windows as the plan gives it, so an uneven split (a fast GPU taking more)
trains on exactly the samples an even split would; the stages of one pipeline read the same slice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

FEISTEL_ROUNDS = 4


def replica_slices(micro_batches: tuple[int, ...]) -> list[slice]:
    """Where each replica's windows sit in a global micro-batch."""
    ends = np.cumsum(micro_batches).tolist()
    return [slice(end - size, end) for size, end in zip(micro_batches, ends, strict=True)]


class TokenStream:
    """One split's packed tokens on this machine's disk, read window by window."""

    def __init__(self, path: Path, dtype: str, sequence_length: int):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.length = sequence_length
        self.tokens = self.path.stat().st_size // self.dtype.itemsize
        self.windows = max(0, (self.tokens - 1) // sequence_length)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The windows at `indices`, as a (len(indices), L + 1) int64 array."""
        out = np.empty((len(indices), self.length + 1), dtype=np.int64)
        size = self.dtype.itemsize
        with self.path.open("rb") as file:
            for row, index in enumerate(indices):
                file.seek(int(index) * self.length * size)
                data = file.read((self.length + 1) * size)
                out[row] = np.frombuffer(data, dtype=self.dtype)
        return out


class Order:
    """Epoch `epoch`'s order of `count` windows: a seeded bijection of [0, count)."""

    def __init__(self, count: int, seed: int, epoch: int):
        bits = max(2, (count - 1).bit_length())
        self.half = (bits + bits % 2) // 2  # two equal halves
        self.mask = (1 << self.half) - 1
        self.count = count
        self.keys = [_round_key(seed, epoch, number) for number in range(FEISTEL_ROUNDS)]

    def __getitem__(self, position: int) -> int:
        value = position
        while True:  # cycle-walk: encrypt again until the value falls in range
            left, right = value >> self.half, value & self.mask
            for key in self.keys:
                left, right = right, left ^ (_mix(right, key) & self.mask)
            value = (left << self.half) | right
            if value < self.count:
                return value


def training_batches(
    stream: TokenStream, batch_size: int, seed: int, skip: int = 0, rows: slice = slice(None)
) -> Iterator[torch.Tensor]:
    """Global micro-batches forever, reshuffled each epoch by (seed, epoch); `skip` resumes
    mid-stream; only `rows` of each (this replica's slice) are read."""
    per_epoch = stream.windows // batch_size
    if per_epoch == 0:
        raise ValueError(f"{stream.path}: {stream.windows} windows, fewer than one batch")
    epoch, position = divmod(skip, per_epoch)
    while True:
        order = Order(stream.windows, seed, epoch)
        for index in range(position, per_epoch):
            start = index * batch_size
            chosen = np.asarray([order[start + i] for i in range(batch_size)])
            yield torch.from_numpy(stream.read(chosen[rows]))
        epoch, position = epoch + 1, 0


def evaluation_batches(
    stream: TokenStream, batch_size: int, count: int, rows: slice = slice(None)
) -> list[torch.Tensor]:
    """The same first `count` validation micro-batches every time (wrapping if the set is
    small); only `rows` of each are read."""
    indices = np.arange(count * batch_size) % stream.windows
    return [
        torch.from_numpy(stream.read(indices[i * batch_size : (i + 1) * batch_size][rows]))
        for i in range(count)
    ]


def _round_key(seed: int, epoch: int, number: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(value: int, key: int) -> int:
    """A cheap keyed mixing function (splitmix64's finaliser)."""
    value = (value ^ key) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)
