"""A corpus prepared once: read, split, tokenized and packed by Ray Data, cached on the job's
storage, then streamed by every training rank from disk.

Preparing reads every file with Ray Data's own readers (binary files, JSON lines, Parquet),
sends each document to the validation split when a hash of its content says so (deterministic,
whatever the order or the layout), tokenizes and packs the documents of each block in Ray Data
tasks (each document followed by the tokenizer's end-of-text token), and writes the two splits
as flat files of token ids. The result is kept under `<storage>/_corpora/<key>/`, where the key
hashes the files (path, size, version), the data settings and the tokenizer: a re-run, a resume
and every sweep trial reuse it, on another machine too when the storage is S3. It does not
depend on the sequence length, which only decides how windows are cut when reading.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.data.sources import CorpusError, Sources, arrow_location, find_sources
from shipyard.data.tokenizer import BYTES, Tokenizer, from_folder, train_bpe
from shipyard.errors import ShipyardError, SpecError
from shipyard.runtime.local import stop_ray_data_actors
from shipyard.spec.data import DataSpec
from shipyard.spec.job import JobSpec
from shipyard.storage import cache_root, is_remote, open_store

CORPORA = "_corpora"  # under the job's storage
TOKENIZERS = "_tokenizers"
MANIFEST = "corpus.json"
SPLITS = ("train", "validation")
FORMAT_VERSION = 1  # part of every key: a new packing format never reads an old cache
HASH_BUCKETS = 10_000
PACK_BATCH = 128  # documents per packing task (a JSONL piece is packed whole: see _documents)


@dataclass(frozen=True)
class Corpus:
    """A prepared corpus: where its packed token files are, and what they hold."""

    location: str  # <storage>/_corpora/<key>: a folder or s3://…
    key: str
    dtype: str  # of the token files
    tokens: dict[str, int]  # per split
    documents: dict[str, int]
    files: int
    source: str
    tokenizer: Tokenizer
    prepared_at: float  # when it was tokenized (a reused corpus keeps its first time)
    reused: bool = False  # found in the cache: nothing was read or tokenized this time

    def windows(self, split: str, sequence_length: int) -> int:
        """How many windows of `sequence_length` (+1 target) a split cuts into."""
        return max(0, (self.tokens[split] - 1) // sequence_length)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for the workers."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Corpus:
        return cls(**{**data, "tokenizer": Tokenizer(**data["tokenizer"])})


def prepare_corpus(job: JobSpec) -> Corpus:
    """The job's corpus, from the cache or prepared now with Ray Data (needs a running Ray)."""
    sources = _checked(lambda: find_sources(job.data))
    tokenizer = _checked(lambda: resolve_tokenizer(job, sources))
    key = hashlib.sha256(
        json.dumps([FORMAT_VERSION, sources.fingerprint(job.data), tokenizer.fingerprint]).encode()
    ).hexdigest()[:32]
    store = open_store(job.storage)
    manifest = store.get_text(f"{CORPORA}/{key}/{MANIFEST}")
    if manifest is not None:
        return _from_manifest(json.loads(manifest), f"{store.uri}/{CORPORA}/{key}", tokenizer)
    try:
        return _prepare(job.data, sources, tokenizer, store, key)
    finally:
        stop_ray_data_actors()


def resolve_tokenizer(job: JobSpec, sources: Sources | None = None) -> Tokenizer:
    """The job's tokenizer: bytes, a folder's, the model folder's, or one trained on the
    corpus (once; cached on the job's storage by the corpus's content)."""
    spec = job.tokenizer
    if spec is None:
        folder = _model_folder(job)
        if folder is not None and (folder / "tokenizer.json").is_file():
            return from_folder(folder, str(folder))
        return BYTES
    if spec.bytes:
        return BYTES
    if spec.path:
        from shipyard.models.huggingface.config import local_folder

        return from_folder(local_folder(spec.path, "tokenizer.path"), spec.path)
    sources = sources or find_sources(job.data)
    settings = [sources.fingerprint(job.data), spec.train.model_dump(mode="json")]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:32]
    store = open_store(job.storage)
    saved = store.get_text(f"{TOKENIZERS}/{key}/tokenizer.json")
    if saved is not None:
        end = json.loads(store.get_text(f"{TOKENIZERS}/{key}/{MANIFEST}") or "{}")
        return Tokenizer(saved, end.get("end_of_text"))
    try:
        texts = _training_texts(job.data, sources)
        tokenizer = train_bpe(texts, spec.train.vocab_size, spec.train.min_frequency)
    except ShipyardError:
        raise
    except Exception as error:  # Ray's wrapping of what a reading task raised
        raise _diagnosed(error, job.data, sources) from None
    store.put_text(f"{TOKENIZERS}/{key}/tokenizer.json", tokenizer.definition)
    store.put_text(
        f"{TOKENIZERS}/{key}/{MANIFEST}", json.dumps({"end_of_text": tokenizer.end_of_text})
    )
    return tokenizer


def tokenizer_vocabulary(job: JobSpec) -> int:
    """How many ids the job's tokenizer gives, known without reading the corpus (a trained
    one's: at most its vocab_size)."""
    spec = job.tokenizer
    if spec is not None and spec.train is not None:
        return spec.train.vocab_size
    return resolve_tokenizer(job).vocabulary_size


def local_corpus(corpus: Corpus, filesystem: Any = None) -> Path:
    """The corpus's folder on this machine: its storage folder, or a copy of it downloaded
    once (per machine) from S3, appearing whole or not at all. Workers pass the pyarrow S3 file
    system the driver made (it carries the endpoint and keys, as Ray Train's checkpoints do);
    without one, boto3 finds them here."""
    if not is_remote(corpus.location):
        return Path(corpus.location)
    target = cache_root() / "corpora" / corpus.key
    if (target / MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{corpus.key}."))
    try:
        for name in (*[f"{split}.bin" for split in SPLITS], MANIFEST):
            _download(corpus.location, name, staging / name, filesystem)
        try:
            staging.rename(target)
        except OSError:  # another rank of this machine was first
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _download(location: str, name: str, local: Path, filesystem: Any) -> None:
    if filesystem is None:
        open_store(location).download(name, local)
        return
    path = f"{location.removeprefix('s3://')}/{name}"
    with filesystem.open_input_stream(path) as remote, local.open("wb") as file:
        shutil.copyfileobj(remote, file, length=16 << 20)


def document_split(content: bytes, validation_fraction: float) -> str:
    """A document's split, from a hash of its content: the same wherever and whenever it is
    read (and duplicates of it land together)."""
    bucket = int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "little")
    return "validation" if bucket % HASH_BUCKETS < validation_fraction * HASH_BUCKETS else "train"


def token_dtype(vocabulary_size: int) -> str:
    return "uint8" if vocabulary_size <= 256 else "uint16" if vocabulary_size <= 65536 else "uint32"


def _prepare(data: DataSpec, sources: Sources, tokenizer: Tokenizer, store, key: str) -> Corpus:
    """Read, split, tokenize and pack with Ray Data; write the split files, then the manifest."""
    dtype = token_dtype(tokenizer.vocabulary_size)
    options = {
        "tokenizer": tokenizer,
        "validation_fraction": data.validation_fraction,
        "dtype": dtype,
        "pretokenized": data.tokens_field is not None,
    }
    packed = [
        documents.map_batches(
            pack_documents, fn_kwargs=options, batch_format="numpy", batch_size=batch_size
        )
        for documents, batch_size in _documents(data, sources)
    ]
    staging = Path(tempfile.mkdtemp(prefix="shipyard-corpus-"))
    tokens, documents = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    try:
        files = {split: (staging / f"{split}.bin").open("wb") for split in SPLITS}
        try:
            for batch in _in_order(packed):
                for split in SPLITS:
                    for chunk, count in zip(batch[split], batch[f"{split}_documents"], strict=True):
                        files[split].write(chunk)
                        tokens[split] += len(chunk) // np.dtype(dtype).itemsize
                        documents[split] += int(count)
        except ShipyardError:
            raise
        except Exception as error:
            raise _diagnosed(error, data, sources) from None
        finally:
            for file in files.values():
                file.close()
        if not tokens["train"]:
            raise CorpusError(f"data.source: {sources.source!r} gave no training tokens.")
        manifest = {
            "dtype": dtype,
            "tokens": tokens,
            "documents": documents,
            "files": len(sources.files),
            "source": sources.source,
            "tokenizer": tokenizer.fingerprint,
            "prepared_at": time.time(),
        }
        for split in SPLITS:
            store.upload(staging / f"{split}.bin", f"{CORPORA}/{key}/{split}.bin")
        store.put_text(f"{CORPORA}/{key}/{MANIFEST}", json.dumps(manifest, indent=2))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    corpus = _from_manifest(manifest, f"{store.uri}/{CORPORA}/{key}", tokenizer)
    return Corpus(**{**asdict(corpus), "tokenizer": tokenizer, "reused": False})


def pack_documents(
    batch: dict[str, np.ndarray],
    tokenizer: Tokenizer,
    validation_fraction: float,
    dtype: str,
    pretokenized: bool = False,
) -> dict[str, list]:
    """A block of documents (Ray Data task) as one packed run of token ids per split: each
    document's tokens, then the end-of-text token."""
    texts: dict[str, list] = {split: [] for split in SPLITS}
    for document, path in zip(batch["document"], batch["path"], strict=True):
        # A field's text arrives as str, a text file as its bytes; either is hashed as UTF-8.
        text = document if isinstance(document, str) else None
        content = text.encode("utf-8") if text is not None else bytes(document)
        split = document_split(content, validation_fraction)
        if pretokenized:
            texts[split].append(_token_ids(content, path, tokenizer.vocabulary_size))
        elif tokenizer.definition is None:
            texts[split].append(content)
        else:
            texts[split].append(text if text is not None else _utf8(content, path))
    packed: dict[str, list] = {}
    end = np.asarray([] if tokenizer.end_of_text is None else [tokenizer.end_of_text], np.int64)
    for split, chosen in texts.items():
        encoded = chosen if pretokenized else _encode(tokenizer, chosen)
        ids = [np.concatenate([each, end]) for each in encoded]
        joined = np.concatenate(ids).astype(dtype) if ids else np.empty(0, dtype)
        packed[split] = [joined.tobytes()]
        packed[f"{split}_documents"] = [len(chosen)]
    return packed


def _encode(tokenizer: Tokenizer, documents: list) -> list[np.ndarray]:
    if tokenizer.definition is None:  # raw bytes: no decoding, any file is a byte stream
        return [np.frombuffer(each, dtype=np.uint8).astype(np.int64) for each in documents]
    return tokenizer.encode(documents)


def _token_ids(content: bytes, path: str, vocabulary_size: int) -> np.ndarray:
    ids = np.frombuffer(content, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocabulary_size):
        raise CorpusError(
            f"data.source: {path}: a pre-tokenized row has token id {int(ids.max())} (or "
            f"{int(ids.min())}), outside the tokenizer's {vocabulary_size} ids. To fix: give "
            "the tokenizer that made them (tokenizer.path)."
        )
    return ids


def _utf8(content: bytes, path: str) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(
            f"data.source: {path} is not UTF-8 (byte {error.start}: {error.reason}). Shipyard "
            "refuses it rather than replace characters a text tokenizer would learn from. "
            "To fix: convert it to UTF-8, or use tokenizer: bytes."
        ) from None


def _in_order(datasets) -> Any:
    """Every block of each dataset, one dataset after the other."""
    for dataset in datasets:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


def _documents(data: DataSpec, sources: Sources) -> list[tuple[Any, int | None]]:
    """A dataset of documents per format, rows {"document": str or a text file's bytes, "path":
    str}, with the documents per packing task it takes; the formats come in a fixed order, and
    each keeps its files' order."""
    import ray.data

    from shipyard.data.jsonl import JsonLinesDatasource

    datasets, cpus = [], _cpus()
    sizes_by_uri = {file.uri: file.size for file in sources.files}
    for kind, uris in sources.by_format().items():
        paths, filesystem = arrow_location(uris)
        # A read streams its blocks out as the tokenizing tasks take them, holding its slot
        # till the last: with a CPU of its own it would keep one tokenizing task from running.
        reading = {
            "filesystem": filesystem,
            "include_paths": True,
            "num_cpus": 0,
            "concurrency": min(cpus, len(uris)),
        }
        if kind == "text":
            read = ray.data.read_binary_files(paths, **reading)
            datasets.append((read.map_batches(_text_documents, batch_format="numpy"), PACK_BATCH))
        elif kind == "jsonl":
            # Lines parsed here: Ray's JSON reader goes through pandas and is 3x slower, and
            # its text reader reads a whole file in one task (see jsonl.py).
            sizes = [sizes_by_uri[uri] for uri in uris]
            source = JsonLinesDatasource(paths, sizes, filesystem)
            # A block per task: a read split further is not fused with the packing.
            read = ray.data.read_datasource(source, override_num_blocks=source.task_count)
            field = data.tokens_field or data.text_field
            name = "data.tokens_field" if data.tokens_field else "data.text_field"
            kwargs = {"field": field, "name": name}
            # Packed a piece per task, in the task that read it: a batch size would keep
            # Ray Data from fusing the read with the packing (and ship every line between them).
            parsed = read.map_batches(_json_documents, fn_kwargs=kwargs, batch_format="numpy")
            datasets.append((parsed, None))
        else:
            column = data.tokens_field or data.text_column
            read = ray.data.read_parquet(paths, columns=[column], **reading)
            kwargs = {
                "field": column,
                "name": "data.tokens_field" if data.tokens_field else "data.text_column",
            }
            parsed = read.map_batches(_field_documents, fn_kwargs=kwargs, batch_format="numpy")
            datasets.append((parsed, PACK_BATCH))
    for dataset, _ in datasets:  # the same files give the same token files, byte for byte
        dataset.context.execution_options.preserve_order = True
    return datasets


def _cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _text_documents(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"document": batch["bytes"], "path": batch["path"]}


def _json_documents(batch: dict[str, np.ndarray], field: str, name: str) -> dict[str, Any]:
    """JSON lines as documents (a line that does not parse is named by the scan that follows
    a failure: see _diagnosed)."""
    records = {field: [], "path": batch["path"]}
    for line, path in zip(batch["text"], batch["path"], strict=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CorpusError(f"data.source: {path}: a line is not JSON.") from None
        if not isinstance(record, dict):
            raise CorpusError(f"data.source: {path}: a line is not a JSON object.")
        records[field].append(record.get(field))
    return _field_documents(records, field, name)


def _field_documents(batch: dict[str, Any], field: str, name: str) -> dict[str, Any]:
    if field not in batch:
        path = batch["path"][0] if len(batch.get("path", [])) else "a file"
        raise CorpusError(
            f"data.source: {path} has no {name} {field!r} in its records. To fix: set "
            f"{name} to the field holding each document."
        )
    documents = []
    for value, path in zip(batch[field], batch["path"], strict=True):
        if value is None:
            raise CorpusError(
                f"data.source: {path}: a record lacks {name} {field!r}. To fix: every record "
                "needs it (or remove the record)."
            )
        if isinstance(value, str):
            documents.append(value)
        else:  # pre-tokenized ids
            documents.append(np.asarray(value, dtype=np.int64).tobytes())
    return {"document": np.array(documents, dtype=object), "path": batch["path"]}


def _training_texts(data: DataSpec, sources: Sources):
    """The training split's documents as text, streamed to the driver (to train a tokenizer)."""
    for batch in _in_order([dataset for dataset, _ in _documents(data, sources)]):
        for document, path in zip(batch["document"], batch["path"], strict=True):
            text = document if isinstance(document, str) else None
            content = text.encode("utf-8") if text is not None else bytes(document)
            if document_split(content, data.validation_fraction) == "train":
                yield text if text is not None else _utf8(content, path)


def _from_manifest(manifest: dict[str, Any], location: str, tokenizer: Tokenizer) -> Corpus:
    return Corpus(
        location=location,
        key=location.rsplit("/", 1)[-1],
        dtype=manifest["dtype"],
        tokens=manifest["tokens"],
        documents=manifest["documents"],
        files=manifest["files"],
        source=manifest["source"],
        tokenizer=tokenizer,
        prepared_at=manifest["prepared_at"],
        reused=True,
    )


def _model_folder(job: JobSpec) -> Path | None:
    path = getattr(job.model, "path", None)
    if not path:
        return None
    from shipyard.models.huggingface.config import local_folder

    return local_folder(path)


def _checked(work):
    """`work()`, with a ValueError (a spec problem found in the files) as a SpecError."""
    try:
        return work()
    except ValueError as error:
        if isinstance(error, ShipyardError):
            raise
        raise SpecError(str(error)) from None


def _diagnosed(error: Exception, data: DataSpec, sources: Sources) -> Exception:
    """The first bad JSONL line we can find (Ray's reader does not say which), else our own
    error from inside a Ray Data task, else Ray's message."""
    for file in sources.files:
        if file.format == "jsonl":
            problem = _first_bad_line(file.uri, data.tokens_field or data.text_field)
            if problem:
                return CorpusError(f"data.source: {file.uri}:{problem}")
    cause: BaseException | None = error
    while cause is not None:
        found = _our_message(cause)
        if found:
            return CorpusError(found)
        cause = getattr(cause, "cause", None) or cause.__cause__
    lines = str(error).strip().splitlines()
    return CorpusError(f"data.source: reading the corpus failed: {lines[-1] if lines else error}")


def _our_message(error: BaseException) -> str | None:
    """Our own message inside an error Ray raised for a failed task: the error itself, or the
    'CorpusError: data.source: …' line of the remote traceback Ray keeps only as text."""
    text = str(error)
    marker = "data.source:"
    if isinstance(error, ShipyardError):
        lines = [line for line in text.splitlines() if marker in line]
        return lines[-1][lines[-1].index(marker) :] if lines else text
    for line in reversed(text.splitlines()):
        if f"{CorpusError.__name__}: {marker}" in line:
            return line[line.index(marker) :]
    return None


def _first_bad_line(uri: str, field: str) -> str | None:
    """'line N: what is wrong' for the first line of a JSONL file that is not a JSON object
    with `field`, or None."""
    if is_remote(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        text = open_store(f"s3://{bucket}").get_text(key) or ""
    else:
        text = Path(uri).read_text(errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number}: not JSON ({error.msg}). To fix: one JSON object per line."
        if not isinstance(record, dict) or field not in record:
            return (
                f"line {number}: the record has no field {field!r}. To fix: set "
                "data.text_field (or data.tokens_field) to the field holding each document."
            )
    return None
