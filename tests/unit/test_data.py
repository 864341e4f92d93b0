"""Windows cut from documents, and the resumable, deterministic micro-batch stream."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shipyard import SpecError
from shipyard.data.batches import evaluation_batches, replica_slices, training_batches
from shipyard.data.corpus import corpus_files, cut_windows, validation_stride
from shipyard.spec.job import DataSpec


def test_documents_are_cut_into_windows_with_every_kth_held_out():
    document = bytes(range(100)) * 2  # 200 bytes -> 20 windows of 10
    (out,) = cut_windows({"bytes": np.array([document, b"short"], dtype=object)}, 10, 5)
    assert out["tokens"].shape == (20, 10)
    assert out["tokens"].dtype == np.uint8
    assert out["tokens"][1].tolist() == list(range(10, 20))
    assert out["validation"].sum() == 4
    assert out["validation"].tolist()[:5] == [False, False, False, False, True]


def test_documents_shorter_than_a_window_yield_no_batch():
    assert list(cut_windows({"bytes": np.array([b"tiny"], dtype=object)}, 10, 5)) == []


def test_validation_stride():
    assert validation_stride(0.05) == 20
    assert validation_stride(0.5) == 2


def test_stdlib_corpus_is_bounded_and_stable():
    spec = DataSpec(max_bytes=100_000)
    files = corpus_files(spec)
    assert files == corpus_files(spec)
    assert sum(f.stat().st_size for f in files[1:]) <= 100_000
    assert all(f.suffix == ".py" for f in files)


def test_missing_source_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match=r"data.source: .* neither 'python-stdlib' nor"):
        corpus_files(DataSpec(source=str(tmp_path / "nope")))


def test_folder_without_text_is_a_spec_error(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(SpecError, match="holds no text files"):
        corpus_files(DataSpec(source=str(tmp_path)))


def windows(count: int = 10) -> np.ndarray:
    return np.arange(count * 3, dtype=np.uint8).reshape(count, 3)


def take(stream, count):
    return [batch.tolist() for batch in itertools.islice(stream, count)]


def test_stream_is_deterministic_and_reshuffles_each_epoch():
    first = take(training_batches(windows(), 2, seed=7), 10)
    assert first == take(training_batches(windows(), 2, seed=7), 10)
    assert first[:5] != first[5:10], "a new epoch has a new order"
    epoch_rows = sorted(row for batch in first[:5] for row in batch)
    assert epoch_rows == windows().tolist(), "an epoch visits every window once"
    assert first != take(training_batches(windows(), 2, seed=8), 10)


@pytest.mark.parametrize("skip", [0, 3, 5, 12])
def test_skipping_resumes_the_same_stream(skip):
    whole = take(training_batches(windows(), 2, seed=1), skip + 6)
    resumed = take(training_batches(windows(), 2, seed=1, skip=skip), 6)
    assert resumed == whole[skip:]


def test_evaluation_batches_are_fixed_and_wrap():
    batches = evaluation_batches(windows(3), batch_size=2, count=2)
    assert [b.tolist() for b in batches] == [
        [[0, 1, 2], [3, 4, 5]],
        [[6, 7, 8], [0, 1, 2]],
    ]


def test_replica_slices_tile_the_global_micro_batch():
    assert replica_slices((6, 2)) == [slice(0, 6), slice(6, 8)]
    assert replica_slices((4, 4, 4)) == [slice(0, 4), slice(4, 8), slice(8, 12)]
