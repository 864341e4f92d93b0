"""JSON-lines files read by Ray Data in byte ranges: many small reads instead of one per file.

Ray Data's `read_text` reads a whole file in one task before it gives its first line, so one
large JSONL file is read by one worker, which must hold all of it, while the tokenizing tasks
wait. Here every file is cut into pieces of about `PIECE_BYTES`, and each task reads one piece
(or a run of small files, up to a piece's size). A piece owns the lines that start inside it
(its last one may run past its end), so every line is read exactly once, and the pieces in
order give the file's lines in order. A worker holds about one piece at a time however large
the file, and tokenizing starts as soon as the first piece is read.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pyarrow.fs import LocalFileSystem
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from shipyard.data.sources import CorpusError

PIECE_BYTES = 4 << 20
READ_AHEAD = 1 << 16  # bytes fetched at a time to finish the line that crosses a piece's end


class JsonLinesDatasource(Datasource):
    """Rows {"text": a line, "path": its file}: every file's lines in order, a read task per
    piece of a large file or per run of small files. `filesystem` is pyarrow's (S3 with
    Shipyard's endpoint and keys), or None for local paths."""

    def __init__(self, paths: list[str], sizes: list[int], filesystem: Any = None):
        self._files = list(zip(paths, sizes, strict=True))
        self._filesystem = filesystem

    def get_name(self) -> str:
        return "JsonLines"

    @property
    def task_count(self) -> int:
        return len(self._tasks())

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, size in self._files)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        # Pieces by size, not by `parallelism`: a task's memory stays the same at any scale.
        tasks = []
        for ranges in self._tasks():
            metadata = BlockMetadata(
                num_rows=None,
                size_bytes=sum(end - start for _, _, start, end in ranges),
                input_files=sorted({path for path, *_ in ranges}),
                exec_stats=None,
            )
            read = _ranges_reader(ranges, self._filesystem)
            tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
        return tasks

    def _tasks(self) -> list[list[tuple[str, int, int, int]]]:
        """(path, size, start, end) ranges per task, in order: pieces of about PIECE_BYTES,
        small files together (a task each would cost more to schedule than to read)."""
        tasks, current, taken = [], [], 0
        for path, size in self._files:
            for start, end in pieces(size, PIECE_BYTES):
                current.append((path, size, start, end))
                taken += end - start
                if taken >= PIECE_BYTES:
                    tasks.append(current)
                    current, taken = [], 0
        return [*tasks, current] if current else tasks


def pieces(size: int, piece_bytes: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges covering a file of `size` bytes."""
    return [(start, min(start + piece_bytes, size)) for start in range(0, size, piece_bytes)]


def lines_in(file: Any, size: int, start: int, end: int) -> list[bytes]:
    """The non-blank lines of `file` (random access: read_at(count, offset)) that start in
    [start, end), without their line ends."""
    begin = max(start - 1, 0)  # the byte before a piece says whether a line starts at it
    data = file.read_at(end - begin, begin)
    if start > 0:
        first = data.find(b"\n")
        if first == -1:  # a line runs across the whole piece: the piece it started in owns it
            return []
        data = data[first + 1 :]
    if data and not data.endswith(b"\n"):
        data += _rest_of_line(file, size, end)
    # Split on "\n" alone, as JSON lines are: a JSON string may hold U+2028, which
    # str.splitlines (and so Ray's text reader) would take for a line end.
    return [line for line in data.split(b"\n") if line.strip()]


def _rest_of_line(file: Any, size: int, position: int) -> bytes:
    rest = bytearray()
    while position < size:
        more = file.read_at(min(READ_AHEAD, size - position), position)
        cut = more.find(b"\n")
        if cut != -1:
            return bytes(rest + more[:cut])
        rest += more
        position += len(more)
    return bytes(rest)


def _ranges_reader(ranges: list[tuple[str, int, int, int]], filesystem: Any):
    def read() -> list[pa.Table]:
        texts, paths = [], []
        for path, size, start, end in ranges:
            with (filesystem or LocalFileSystem()).open_input_file(path) as file:
                lines = lines_in(file, size, start, end)
            texts += [_utf8_line(line, path, start) for line in lines]
            paths += [path] * len(lines)
        return [pa.table({"text": pa.array(texts, pa.large_string()), "path": paths})]

    return read


def _utf8_line(line: bytes, path: str, start: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(
            f"data.source: {path} is not UTF-8 (a line after byte {start}, at its byte "
            f"{error.start}: {error.reason}). JSON text is UTF-8. To fix: convert the file."
        ) from None
