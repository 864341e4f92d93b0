"""Real corpora through real Ray Data: JSONL, Parquet, text folders and S3 each train; a BPE
trained on the corpus round-trips and travels into the export; a corpus is tokenized once; a
worker's memory does not grow with the corpus; broken files are named with their line.

The documents are this machine's Python standard library sources, one per file.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer as LibraryTokenizer
from transformers import AutoTokenizer

from shipyard.data import jsonl
from shipyard.data.batches import TokenStream
from shipyard.data.corpus import CORPORA, local_corpus, prepare_corpus
from shipyard.errors import SpecError
from shipyard.serve.export import export_checkpoint
from shipyard.spec.job import JobSpec
from shipyard.spec.load import validate
from shipyard.storage import open_store
from shipyard.train.checkpoint import latest_checkpoint
from shipyard.train.trainer import run_training
from tests.integration.conftest import TINY_JOB

pytestmark = pytest.mark.integration

BPE = {"train": {"vocab_size": 512}}


def stdlib_documents(limit_bytes: int, copies: int = 1) -> list[str]:
    """Python library sources cut into documents of about 2 KB at blank lines (`copies` times,
    each copy made unique). Many small documents make the hashed validation split hold some
    whatever this machine's Python version ships."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="strict")
        documents.extend(paragraph_groups(text, 2_000))
        total += len(text)
        if total > limit_bytes:
            break
    return [f"# copy {n}\n{text}" for n in range(copies) for text in documents]


def paragraph_groups(text: str, size: int) -> list[str]:
    """`text` as runs of whole paragraphs of at least `size` characters (the last may be less)."""
    groups, current = [], ""
    for paragraph in text.split("\n\n"):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= size:
            groups.append(current)
            current = ""
    return [*groups, current] if current.strip() else groups


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """The same documents as JSONL, as Parquet, as pre-tokenized Parquet (their bytes), and as
    a folder ("text") mixing text files with a JSONL and a Parquet file."""
    folder = tmp_path_factory.mktemp("corpora")
    documents = stdlib_documents(300_000)
    (folder / "library.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "content": d}) for i, d in enumerate(documents))
    )
    pq.write_table(pa.table({"body": documents}), folder / "library.parquet")
    ids = [list(d.encode()) for d in documents]
    pq.write_table(pa.table({"input_ids": ids}), folder / "tokens.parquet")
    mixed = folder / "mixed"
    mixed.mkdir()
    for index, document in enumerate(documents[:-20]):
        (mixed / f"{index:04d}.py").write_text(document)
    (mixed / "more.jsonl").write_text(
        "\n".join(json.dumps({"text": d}) for d in documents[-20:-10])
    )
    pq.write_table(pa.table({"text": documents[-10:]}), mixed / "more.parquet")
    return {
        "jsonl": folder / "library.jsonl",
        "parquet": folder / "library.parquet",
        "tokens": folder / "tokens.parquet",
        "text": mixed,
    }


def corpus_job(name: str, storage, data: dict, tokenizer=None, **model) -> JobSpec:
    document = {
        **TINY_JOB,
        "name": name,
        "storage": str(storage),
        "data": data,
        "model": {**TINY_JOB["model"], **model},
    }
    if tokenizer:
        document["tokenizer"] = tokenizer
    return validate(JobSpec, document, source=f"<test job {name}>")


def losses(result) -> list[float]:
    return [row["loss"] for row in result.history if "loss" in row]


@pytest.fixture(scope="module")
def jsonl_run(ray_session, runs_dir, corpora):
    """The GPT trained on the JSONL corpus with a 512-token BPE trained on it."""
    data = {"source": str(corpora["jsonl"]), "text_field": "content"}
    job = corpus_job("corpus-jsonl", runs_dir, data, BPE, vocabulary_size=512)
    return job, run_training(job)


def test_jsonl_with_a_trained_bpe_trains_and_is_tokenized_once(jsonl_run):
    job, result = jsonl_run
    assert losses(result)[-1] < losses(result)[0] - 0.5, losses(result)
    again = prepare_corpus(job)
    assert again.reused, "a second run reads the cached tokens; nothing is tokenized again"
    # The checkpoint names the tokens it trained on, for a resume to check (check_resumable).
    assert latest_checkpoint(str(job.storage), job.name).corpus == again.key


@pytest.mark.parametrize(("kind", "data"), [("parquet", {"text_column": "body"}), ("text", {})])
def test_parquet_and_text_folders_train(ray_session, runs_dir, corpora, kind, data):
    job = corpus_job(f"corpus-{kind}", runs_dir, {"source": str(corpora[kind]), **data})
    result = run_training(job)
    assert losses(result)[-1] < losses(result)[0] - 0.5, losses(result)


def test_jsonl_read_in_many_pieces_packs_what_parquet_of_the_same_documents_packs(
    ray_session, tmp_path, corpora, monkeypatch
):
    monkeypatch.setattr(jsonl, "PIECE_BYTES", 4096)  # ~75 pieces, most cutting a line
    prepared = {
        kind: prepare_corpus(corpus_job(f"pieces-{kind}", tmp_path / kind, data))
        for kind, data in (
            ("jsonl", {"source": str(corpora["jsonl"]), "text_field": "content"}),
            ("parquet", {"source": str(corpora["parquet"]), "text_column": "body"}),
        )
    }
    assert prepared["jsonl"].documents == prepared["parquet"].documents
    for split in ("train", "validation"):
        files = [Path(corpus.location) / f"{split}.bin" for corpus in prepared.values()]
        assert files[0].read_bytes() == files[1].read_bytes(), split


def test_a_bpe_trained_on_the_corpus_round_trips_and_is_exported(jsonl_run, runs_dir):
    """The JSONL run's tokenizer: held-out documents decode to themselves, the tokenizers
    library gives the same ids from the saved file, and so does AutoTokenizer from the export."""
    job, _ = jsonl_run
    corpus = prepare_corpus(job)
    tokenizer = corpus.tokenizer
    assert tokenizer.vocabulary_size == 512 and tokenizer.end_of_text == 0
    held_out = stdlib_documents(300_000)[-5:]
    for text in held_out:
        assert tokenizer.decode(tokenizer.encode([text])[0]) == text
    export = export_checkpoint(latest_checkpoint(str(runs_dir), "corpus-jsonl"))
    library = LibraryTokenizer.from_file(str(export.folder / "tokenizer.json"))
    opened = AutoTokenizer.from_pretrained(export.folder, local_files_only=True)
    for text in held_out:
        ids = tokenizer.encode([text])[0].tolist()
        assert library.encode(text).ids == ids
        assert opened(text)["input_ids"] == ids
    assert opened.eos_token_id == tokenizer.end_of_text
    assert "tokenizer.json" in export.files, "the tokenizer is checked like the weights"
    packed = TokenStream(local_corpus(corpus) / "train.bin", corpus.dtype, 32)
    assert packed.read([0]).max() < 512


def test_a_corpus_on_s3_trains_from_a_machine_with_nothing_of_it(
    ray_session, s3, corpora, tmp_path, monkeypatch
):
    open_store(f"{s3}/corpus").upload(corpora["jsonl"], "library.jsonl")
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path / "cache"))
    data = {"source": f"{s3}/corpus", "text_field": "content"}
    job = corpus_job("corpus-s3", f"{s3}/runs", data)
    result = run_training(job)
    assert losses(result)[-1] < losses(result)[0] - 0.5
    keys = open_store(f"{s3}/runs").keys(CORPORA)
    assert {key.rsplit("/", 1)[-1] for key in keys} == {
        "train.bin",
        "validation.bin",
        "corpus.json",
    }, "the tokenized corpus is cached beside the checkpoints"


def test_a_corpus_too_small_for_one_batch_is_refused_before_training(ray_session, tmp_path):
    source = tmp_path / "tiny.jsonl"
    source.write_text(json.dumps({"text": "print('hello')"}))
    job = corpus_job("tiny", tmp_path / "runs", {"source": str(source)})
    with pytest.raises(SpecError, match="gives 0 training windows of 33 tokens"):
        run_training(job)
    assert latest_checkpoint(str(tmp_path / "runs"), "tiny") is None


def test_a_workers_memory_does_not_grow_with_the_corpus(ray_session, runs_dir, tmp_path):
    """The same model on a corpus and on one ten times larger: the ranks stream windows from
    disk, so their resident memory grows by far less than the corpus did."""
    peaks = {}
    for copies in (1, 10):
        path = tmp_path / f"library-{copies}.jsonl"
        documents = stdlib_documents(8_000_000, copies)
        path.write_text("\n".join(json.dumps({"text": d}) for d in documents))
        job = corpus_job(f"memory-{copies}", runs_dir, {"source": str(path)})
        job = job.model_copy(
            update={"train": job.train.model_copy(update={"max_steps": 8, "eval_every": 8})}
        )
        result = run_training(job)
        peaks[copies] = (max(row["rss_mib"] for row in result.history), path.stat().st_size)
    (small, small_bytes), (large, large_bytes) = peaks[1], peaks[10]
    growth = (large_bytes - small_bytes) / 2**20
    assert large - small < growth / 4, (peaks, growth)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "broken.jsonl",
            '{"text": "fine"}\n{"text": "also fine"}\n{"text": "cut',
            "broken.jsonl:line 3: not JSON",
        ),
        (
            "fieldless.jsonl",
            '{"text": "fine"}\n{"body": "no text field"}\n',
            "fieldless.jsonl:line 2: the record has no field 'text'",
        ),
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "latin1.txt is not UTF-8 (byte 3"),
        (
            "latin1.jsonl",
            '{"text": "caf\xe9"}\n'.encode("latin-1"),
            "latin1.jsonl is not UTF-8 (a line after byte 0",
        ),
    ],
)
def test_a_broken_file_is_named_with_its_line_and_nothing_is_written(
    ray_session, tmp_path, name, content, message
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    target = corpus / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    tokenizer = BPE if name.endswith(".txt") else None
    job = corpus_job("broken", tmp_path / "runs", {"source": str(corpus)}, tokenizer)
    with pytest.raises(SpecError) as refused:
        prepare_corpus(job)
    assert message in str(refused.value)
    assert "Traceback" not in str(refused.value)
    assert not (tmp_path / "runs" / CORPORA).exists(), "no partial corpus is left"
