"""The training corpus as Ray Datasets of fixed-length byte-token windows.

Text is tokenized as raw bytes (vocabulary 256), so any text on the machine is a corpus and
nothing is downloaded. Each document is cut into windows of `sequence_length + 1` tokens (inputs
plus the shifted targets); within a document every k-th window goes to validation, so a corpus of
one file still has both splits.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shipyard.errors import SpecError
from shipyard.spec.job import PYTHON_STDLIB, DataSpec

if TYPE_CHECKING:
    import ray.data

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl"}


@dataclass(frozen=True)
class Corpus:
    """Training and validation windows, materialized in Ray's object store in a fixed order."""

    train: ray.data.Dataset
    validation: ray.data.Dataset
    train_windows: int
    validation_windows: int
    files: int
    source: str


def build_corpus(data: DataSpec, sequence_length: int) -> Corpus:
    """Read the corpus through Ray Data and cut it into windows (needs a running Ray)."""
    import ray.data

    files = corpus_files(data)
    if any(file.suffix == ".jsonl" for file in files):
        documents = ray.data.read_json([str(f) for f in files], lines=True).map_batches(
            _encode_text, fn_kwargs={"field": data.text_field}, batch_format="numpy"
        )
    else:
        documents = ray.data.read_binary_files([str(f) for f in files], include_paths=True)
    # Fixed block order: the same spec and seed must give every run the same batches.
    documents.context.execution_options.preserve_order = True
    stride = validation_stride(data.validation_fraction)
    windows = documents.map_batches(
        cut_windows,
        fn_kwargs={"length": sequence_length + 1, "validation_stride": stride},
        batch_format="numpy",
    ).materialize()
    train = windows.map_batches(_select, fn_kwargs={"validation": False}, batch_format="numpy")
    validation = windows.map_batches(_select, fn_kwargs={"validation": True}, batch_format="numpy")
    train, validation = train.materialize(), validation.materialize()
    return Corpus(
        train=train,
        validation=validation,
        train_windows=train.count(),
        validation_windows=validation.count(),
        files=len(files),
        source=data.source,
    )


def corpus_files(data: DataSpec) -> list[Path]:
    """The files to read, in a fixed order, up to `data.max_bytes` (always at least one)."""
    if data.source == PYTHON_STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        candidates = [p for p in root.rglob("*.py") if "site-packages" not in p.parts]
        # Hashing the path spreads the sample over the whole library instead of its first letters.
        candidates.sort(key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())
    else:
        path = Path(data.source).expanduser()
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise SpecError(
                f"data.source: {data.source!r} is neither {PYTHON_STDLIB!r} nor an existing file "
                "or folder. To fix: give the path of a .txt/.jsonl file or of a folder of text."
            )
        candidates = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    files = _up_to_bytes([p for p in candidates if p.is_file()], data.max_bytes)
    if not files:
        raise SpecError(
            f"data.source: {data.source!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})."
        )
    return files


def validation_stride(fraction: float) -> int:
    """Every how-many-th window of a document is held out for validation."""
    return max(2, round(1 / fraction))


def cut_windows(
    batch: dict[str, np.ndarray], length: int, validation_stride: int
) -> Iterator[dict[str, np.ndarray]]:
    """Documents (raw bytes) → non-overlapping token windows, each tagged train or validation.

    Yields nothing for a batch of documents all shorter than one window: Ray Data cannot store
    an empty 2-D tensor column as Arrow.
    """
    windows, held_out = [], []
    for document in batch["bytes"]:
        tokens = np.frombuffer(document, dtype=np.uint8)
        count = len(tokens) // length
        if count:
            windows.append(tokens[: count * length].reshape(count, length))
            held_out.append(np.arange(count) % validation_stride == validation_stride - 1)
    if windows:
        yield {"tokens": np.concatenate(windows), "validation": np.concatenate(held_out)}


def _select(batch: dict[str, np.ndarray], validation: bool) -> Iterator[dict[str, np.ndarray]]:
    chosen = batch["tokens"][batch["validation"] == validation]
    if len(chosen):
        yield {"tokens": chosen}


def _encode_text(batch: dict[str, np.ndarray], field: str) -> dict[str, np.ndarray]:
    if field not in batch:
        raise SpecError(f"data.text_field: {field!r} is not a field of the JSONL records.")
    return {"bytes": np.array([str(text).encode() for text in batch[field]], dtype=object)}


def _up_to_bytes(files: list[Path], max_bytes: int | None) -> list[Path]:
    chosen, total = [], 0
    for file in files:
        size = file.stat().st_size
        if chosen and max_bytes is not None and total + size > max_bytes:
            continue
        chosen.append(file)
        total += size
    return chosen
