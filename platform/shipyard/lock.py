"""One run of a job at a time: an exclusive lock per job and storage location on this machine.

Two runs of one job would share one run folder: Ray's `latest`, `metrics.jsonl`, the tracking
record and S3 uploads would interleave. A run holds an advisory `flock` on a small file in the
storage's folder on this machine (for S3, its local mirror) for as long as it runs. The kernel
drops the lock when its process dies, however it dies, so a crashed run's lock is taken over by
the next run, never obeyed forever. The file says who holds it, for the refusal's message.

Runs on two machines against one S3 prefix are not seen by each other's locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from shipyard.errors import ShipyardError
from shipyard.storage import local_mirror

LOCKS_FOLDER = ".shipyard-locks"


class JobBusyError(ShipyardError):
    """Another process is running the same job (or sweep) on the same storage."""


def lock_file(storage: str, name: str) -> Path:
    """The lock of the run (or sweep) folder `name` under `storage`, on this machine."""
    return local_mirror(storage) / LOCKS_FOLDER / f"{name}.lock"


@contextmanager
def exclusive_run(storage: str, name: str, what: str = "job") -> Iterator[None]:
    """Hold the lock of `name` under `storage` while the body runs; a JobBusyError naming the
    holder if another live process has it."""
    path = lock_file(storage, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            raise JobBusyError(
                f"{what} {name!r} is already running with storage {storage}: "
                f"{_describe(file.read())}. Two runs would write one folder. To fix: wait for "
                "it to end or stop it (Ctrl-C, or `kill` that process); a run that died "
                "releases it by itself."
            ) from None
        try:
            file.seek(0)
            file.truncate()
            file.write(json.dumps(_holder()))
            file.flush()
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def _holder() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return (
            f"process {holder['pid']} on {holder['host']} ({holder['command']}), "
            f"running since {holder['since']}"
        )
    except (ValueError, KeyError, TypeError):  # the holder is writing it right now
        return "another process (it is just starting)"
