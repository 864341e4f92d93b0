"""Corpus files found and checked, documents split by content, the packed token stream read
window by window, and the resumable, deterministic micro-batch order: no Ray needed."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shipyard import SpecError, load_job
from shipyard.data.batches import (
    Order,
    TokenStream,
    evaluation_batches,
    replica_slices,
    training_batches,
)
from shipyard.data.corpus import document_split, pack_documents
from shipyard.data.sources import find_sources
from shipyard.data.tokenizer import BYTES, train_bpe
from shipyard.spec.job import DataSpec


def stream_of(tmp_path, tokens: int = 31, length: int = 3) -> TokenStream:
    path = tmp_path / "train.bin"
    np.arange(tokens, dtype=np.uint16).tofile(path)
    return TokenStream(path, "uint16", length)


def take(batches, count):
    return [batch.tolist() for batch in itertools.islice(batches, count)]


def test_windows_overlap_by_the_one_target_token(tmp_path):
    stream = stream_of(tmp_path)  # 31 tokens, windows of 3 (+1): (31 - 1) // 3 = 10
    assert stream.windows == 10
    assert stream.read(np.array([0, 9])).tolist() == [[0, 1, 2, 3], [27, 28, 29, 30]]


@pytest.mark.parametrize("count", [1, 2, 3, 10, 257, 4096])
def test_an_epoch_order_visits_every_window_once(count):
    order = Order(count, seed=3, epoch=0)
    assert sorted(order[i] for i in range(count)) == list(range(count))


def test_the_stream_is_deterministic_and_reshuffles_each_epoch(tmp_path):
    stream = stream_of(tmp_path)
    first = take(training_batches(stream, 2, seed=7), 10)
    assert first == take(training_batches(stream, 2, seed=7), 10)
    assert first[:5] != first[5:10], "a new epoch has a new order"
    rows = sorted(row for batch in first[:5] for row in batch)
    assert rows == stream.read(np.arange(10)).tolist(), "an epoch visits every window once"
    assert first != take(training_batches(stream, 2, seed=8), 10)


@pytest.mark.parametrize("skip", [0, 3, 5, 12])
def test_skipping_resumes_the_same_stream(tmp_path, skip):
    stream = stream_of(tmp_path)
    whole = take(training_batches(stream, 2, seed=1), skip + 6)
    assert take(training_batches(stream, 2, seed=1, skip=skip), 6) == whole[skip:]


def test_a_replica_reads_only_its_slice_of_each_global_batch(tmp_path):
    stream = stream_of(tmp_path)
    whole = take(training_batches(stream, 4, seed=2), 3)
    second = take(training_batches(stream, 4, seed=2, rows=slice(1, 3)), 3)
    assert second == [batch[1:3] for batch in whole]


def test_evaluation_batches_are_fixed_and_wrap(tmp_path):
    stream = stream_of(tmp_path, tokens=10, length=3)  # 3 windows
    batches = evaluation_batches(stream, batch_size=2, count=2)
    assert [b.tolist() for b in batches] == [
        [[0, 1, 2, 3], [3, 4, 5, 6]],
        [[6, 7, 8, 9], [0, 1, 2, 3]],
    ]


def test_replica_slices_tile_the_global_micro_batch():
    assert replica_slices((6, 2)) == [slice(0, 6), slice(6, 8)]
    assert replica_slices((4, 4, 4)) == [slice(0, 4), slice(4, 8), slice(8, 12)]


def test_documents_are_split_by_their_content():
    documents = [f"document {i}".encode() for i in range(2000)]
    splits = [document_split(d, 0.1) for d in documents]
    assert 150 < splits.count("validation") < 250
    assert splits == [document_split(d, 0.1) for d in documents], "the same every time"


def test_a_block_packs_each_document_then_the_end_token():
    tokenizer = train_bpe(["hello world"] * 10, vocab_size=270, min_frequency=1)
    batch = {"document": np.array([b"hello", b"world"], dtype=object), "path": ["a", "b"]}
    packed = pack_documents(batch, tokenizer, 0.0, "uint16")
    ids = np.frombuffer(packed["train"][0], dtype=np.uint16).tolist()
    end = tokenizer.end_of_text
    hello, world = (tokenizer.encode([w])[0].tolist() for w in ("hello", "world"))
    assert ids == [*hello, end, *world, end]
    assert packed["train_documents"] == [2] and packed["validation_documents"] == [0]
    raw = pack_documents(batch, BYTES, 0.0, "uint8")
    assert np.frombuffer(raw["train"][0], dtype=np.uint8).tobytes() == b"helloworld"


def test_text_that_is_not_utf8_is_refused_by_a_text_tokenizer():
    tokenizer = train_bpe(["x"] * 5, vocab_size=260, min_frequency=1)
    batch = {"document": np.array([b"caf\xe9"], dtype=object), "path": ["corpus/latin1.txt"]}
    with pytest.raises(SpecError, match=r"corpus/latin1.txt is not UTF-8 \(byte 3"):
        pack_documents(batch, tokenizer, 0.0, "uint16")
    assert pack_documents(batch, BYTES, 0.0, "uint8")["train_documents"] == [1], "bytes are bytes"


def test_files_are_found_by_extension_in_a_fixed_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "a.txt").write_text("hello")
    pq.write_table(pa.table({"text": ["y"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.png").write_bytes(b"\x89PNG")
    sources = find_sources(DataSpec(source=str(tmp_path)))
    assert [(f.uri.rsplit("/", 1)[-1], f.format) for f in sources.files] == [
        ("a.txt", "text"),
        ("b.jsonl", "jsonl"),
        ("c.parquet", "parquet"),
    ]
    glob = find_sources(DataSpec(source=str(tmp_path / "*.txt")))
    assert [f.format for f in glob.files] == ["text"]


def test_the_stdlib_corpus_is_bounded_stable_and_utf8():
    spec = DataSpec(max_bytes=100_000)
    files = find_sources(spec).files
    assert files == find_sources(spec).files
    assert sum(f.size for f in files[1:]) <= 100_000
    assert all(f.uri.endswith(".py") for f in files)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, r"holds no file Shipyard reads"),
        (lambda p: (p / "empty.txt").write_text(""), r"empty.txt is empty"),
        (
            lambda p: pq.write_table(pa.table({"body": ["x"]}), p / "c.parquet"),
            r"c.parquet has no column 'text' \(data.text_column\); its columns are body",
        ),
    ],
)
def test_a_bad_corpus_is_named_before_anything_is_read(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(ValueError, match=message):
        find_sources(DataSpec(source=str(tmp_path)))


def test_a_missing_source_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"data.source: .* neither 'python-stdlib' nor"):
        find_sources(DataSpec(source=str(tmp_path / "nope")))


def test_a_tokenizer_folder_without_tokenizer_json_is_a_spec_error(write_job, tmp_path):
    path = write_job({"name": "t", "tokenizer": {"path": str(tmp_path)}})
    with pytest.raises(SpecError, match=r"tokenizer\.path: .* has no tokenizer\.json"):
        load_job(path)


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused(write_job, tmp_path):
    tokenizer = train_bpe(["some text"] * 20, vocab_size=300, min_frequency=1)
    tokenizer.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["eos_token"]
    path = write_job({"name": "t", "tokenizer": {"path": str(tmp_path / "tok")}})
    with pytest.raises(SpecError) as refused:
        load_job(path)
    message = str(refused.value)
    assert "model.vocabulary_size: 256 is smaller than the tokenizer's" in message
    trained = write_job({"name": "t", "tokenizer": {"train": {"vocab_size": 4096}}}, "b.yaml")
    with pytest.raises(SpecError, match="256 is smaller than the tokenizer's 4096 tokens"):
        load_job(trained)
    with pytest.raises(SpecError, match="tokenizer: 'bpe' is not allowed; bytes"):
        load_job(write_job({"name": "t", "tokenizer": "bpe"}, "c.yaml"))


@pytest.mark.parametrize("piece_bytes", [1, 3, 7, 64, 100_000])
@pytest.mark.parametrize("ending", ["\n", ""])
def test_jsonl_pieces_give_every_line_once_in_order(tmp_path, monkeypatch, piece_bytes, ending):
    from pyarrow.fs import LocalFileSystem

    from shipyard.data import jsonl

    monkeypatch.setattr(jsonl, "READ_AHEAD", 5)  # lines that cross a piece's end take reads
    lines = ['{"text": "a"}', "", '{"text": "' + "long " * 40 + '"}', "  ", '{"text": "\u2028"}']
    lines += [json.dumps({"text": f"line {i}"}) for i in range(30)]
    path = tmp_path / "lines.jsonl"
    path.write_text("\n".join(lines) + ending, encoding="utf-8")
    size = path.stat().st_size
    read = []
    with LocalFileSystem().open_input_file(str(path)) as file:
        for start, end in jsonl.pieces(size, piece_bytes):
            read += jsonl.lines_in(file, size, start, end)
    assert [line.decode() for line in read] == [line for line in lines if line.strip()]


def test_a_jsonl_piece_that_is_not_utf8_names_its_file(tmp_path):
    from shipyard.data.jsonl import JsonLinesDatasource

    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "fine"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    (task,) = JsonLinesDatasource([str(path)], [path.stat().st_size]).get_read_tasks(1)
    with pytest.raises(SpecError, match=r"latin1.jsonl is not UTF-8 \(a line after byte 0"):
        list(task())


def test_small_jsonl_files_share_a_read_task_and_keep_their_order(tmp_path, monkeypatch):
    from shipyard.data import jsonl

    monkeypatch.setattr(jsonl, "PIECE_BYTES", 64)
    files, expected = [], []
    for index, count in enumerate([2, 1, 9, 1, 1]):  # one file of several pieces among small ones
        path = tmp_path / f"{index}.jsonl"
        lines = [json.dumps({"text": f"{index}-{i}"}) for i in range(count)]
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
        expected += [(line, str(path)) for line in lines]
    source = jsonl.JsonLinesDatasource([str(f) for f in files], [f.stat().st_size for f in files])
    tasks = source.get_read_tasks(1)
    assert (
        len(tasks)
        == source.task_count
        < sum(len(jsonl.pieces(f.stat().st_size, 64)) for f in files)
    )
    rows = [row for task in tasks for table in task() for row in table.to_pylist()]
    assert [(row["text"], row["path"]) for row in rows] == expected
