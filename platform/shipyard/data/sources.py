"""The files a corpus is read from, found and checked before anything is read through Ray.

`data.source` is a file, a folder (every file below it), a glob, an s3://bucket/prefix, or
`python-stdlib`. Each file is read by its extension: text (a document per file), JSONL (a
document per line) or Parquet (a document per row). What can be checked without reading the
documents is checked here, naming the file: nothing to read, an unknown format, a Parquet file
without the column.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from shipyard.errors import SpecError
from shipyard.spec.data import PYTHON_STDLIB, DataSpec
from shipyard.storage import is_remote, open_store

FORMATS = {
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
    ".py": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}


class CorpusError(SpecError):
    """A corpus file that cannot be read as its format says (names the file, line or row)."""


@dataclass(frozen=True)
class SourceFile:
    """One file of the corpus: where it is, how to read it, and what version of it."""

    uri: str  # a local path or s3://bucket/key
    format: str  # text, jsonl or parquet
    size: int
    version: str  # modification time or ETag: changes when the file does


@dataclass(frozen=True)
class Sources:
    """Every file of a corpus, in a fixed order."""

    files: tuple[SourceFile, ...]
    source: str  # data.source as written

    @property
    def bytes(self) -> int:
        return sum(file.size for file in self.files)

    def fingerprint(self, data: DataSpec) -> str:
        """Changes whenever the documents read from these files could."""
        fields = data.model_dump(mode="json")
        listing = [(f.uri, f.format, f.size, f.version) for f in self.files]
        return hashlib.sha256(json.dumps([fields, listing]).encode()).hexdigest()

    def by_format(self) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for file in self.files:
            grouped.setdefault(file.format, []).append(file.uri)
        return grouped


def find_sources(data: DataSpec) -> Sources:
    """The corpus's files, checked; raises ValueError naming data.source and the file."""
    if data.source == PYTHON_STDLIB:
        files = _python_stdlib(data.max_bytes)
    elif is_remote(data.source):
        files = _on_s3(data.source)
    else:
        files = _on_disk(data.source)
    if not files:
        raise ValueError(
            f"data.source: {data.source!r} holds no file Shipyard reads "
            f"({', '.join(sorted(FORMATS))}). To fix: point it at text, JSONL or Parquet files."
        )
    for file in files:
        if file.size == 0:
            raise ValueError(f"data.source: {file.uri} is empty. To fix: remove it or fill it.")
        if file.format == "parquet":
            _check_parquet_column(file, data)
    return Sources(tuple(files), data.source)


def _on_disk(source: str) -> list[SourceFile]:
    path = Path(source).expanduser()
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        candidates = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        candidates = [p for p in candidates if p.is_file()]
        if not candidates:
            raise ValueError(
                f"data.source: {source!r} is neither {PYTHON_STDLIB!r} nor an existing file, "
                "folder or glob. To fix: give the path of a file or folder of text, JSONL or "
                "Parquet, a glob such as 'corpus/*.jsonl', or an s3://bucket/prefix."
            )
    files = []
    for candidate in candidates:
        if candidate.name.startswith("."):
            continue
        kind = FORMATS.get(candidate.suffix.lower())
        if kind is None:
            if path.is_file():
                raise ValueError(
                    f"data.source: {candidate} has the extension {candidate.suffix!r}; Shipyard "
                    f"reads {', '.join(sorted(FORMATS))}. To fix: rename it, or convert it."
                )
            continue  # other files in a folder (a README's image, a lock file) are not corpus
        stat = candidate.stat()
        files.append(
            SourceFile(str(candidate.resolve()), kind, stat.st_size, str(stat.st_mtime_ns))
        )
    return files


def _on_s3(source: str) -> list[SourceFile]:
    store = open_store(source)
    store.check()
    files = []
    for key, (etag, size) in sorted(store.listing("").items()):
        kind = FORMATS.get(Path(key).suffix.lower())
        if kind is not None and not Path(key).name.startswith("."):
            files.append(SourceFile(f"{store.uri}/{key}", kind, size, etag))
    return files


def _python_stdlib(max_bytes: int | None) -> list[SourceFile]:
    """A sample of this machine's Python library sources, spread over the whole library by
    hashing each path; only files that are UTF-8 (a handful of test files are not)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = [p for p in root.rglob("*.py") if "site-packages" not in p.parts]
    candidates.sort(key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())
    files, total = [], 0
    for path in candidates:
        size = path.stat().st_size
        if not size or (files and max_bytes is not None and total + size > max_bytes):
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(SourceFile(str(path), "text", size, str(path.stat().st_mtime_ns)))
        total += size
    return files


def _check_parquet_column(file: SourceFile, data: DataSpec) -> None:
    import pyarrow.parquet as pq

    wanted = data.tokens_field or data.text_column
    field = "data.tokens_field" if data.tokens_field else "data.text_column"
    try:
        schema = pq.read_schema(_arrow_path(file.uri), filesystem=_arrow_filesystem(file.uri))
    except Exception as error:  # pyarrow's own message says what is wrong with the file
        raise ValueError(f"data.source: {file.uri} is not a Parquet file ({error}).") from None
    if wanted not in schema.names:
        raise ValueError(
            f"data.source: {file.uri} has no column {wanted!r} ({field}); its columns are "
            f"{', '.join(schema.names)}. To fix: set {field} to one of them."
        )


def _arrow_path(uri: str) -> str:
    return uri.removeprefix("s3://")


def _arrow_filesystem(uri: str):
    """pyarrow's file system for a file: S3 with Shipyard's endpoint and keys, or local."""
    if is_remote(uri):
        bucket = uri.removeprefix("s3://").split("/")[0]
        return open_store(f"s3://{bucket}").arrow_filesystem()
    return None


def arrow_location(uris: list[str]) -> tuple[list[str], object]:
    """Paths and file system for Ray Data's readers (one bucket's, or local)."""
    return [_arrow_path(uri) for uri in uris], _arrow_filesystem(uris[0])
