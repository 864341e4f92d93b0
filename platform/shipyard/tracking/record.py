"""A run's tracking: the trackers fed one row per step, on a thread of their own."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shipyard.spec.job import JobSpec
from shipyard.storage import open_store

RECORD_FILE = "tracking.json"
NOT_METRICS = {"step", "resumed_from_step", "already_complete"}

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Where a run sits: alone, or as a sweep's trial (its parent MLflow run and its folders)."""

    parent_run_id: str | None = None
    trial_id: str | None = None
    trial_values: dict[str, Any] = field(default_factory=dict)
    record_location: str | None = None  # where tracking.json lives (default: the run folder)
    tensorboard_folder: str | None = None  # default: per the job's tracking section
    mlflow_uri: str | None = None  # default: per the job's tracking section
    experiment: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


class Tracker:
    """One backend: MLflow or TensorBoard."""

    name = "tracker"

    def start(self, params: dict[str, str], tags: dict[str, str]) -> None: ...

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def tags(self, tags: dict[str, str]) -> None: ...

    def flush(self) -> None: ...

    def close(self, status: str) -> None: ...


class RunTracking:
    """The trackers of one training run, fed from a queue by a thread of their own."""

    def __init__(
        self,
        trackers: list[Tracker],
        last_step: int,
        save_record: Callable[[int], None],
        warn: Callable[[str], None],
    ):
        self.trackers = trackers
        self.last_step = last_step
        self._save_record = save_record
        self._warn = warn
        self._queue: queue.Queue[tuple[str, tuple] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="shipyard-tracking", daemon=True)
        self._thread.start()

    def start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        self._queue.put(("start", (params, tags)))

    def record(self, row: dict[str, Any]) -> None:
        """A metrics row: its numbers as metrics at its step (once), its checkpoint as a tag."""
        step = row.get("step")
        if not isinstance(step, int) or step <= self.last_step:
            return
        self.last_step = step
        values = {
            key: float(value)
            for key, value in row.items()
            if key not in NOT_METRICS
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        }
        self._queue.put(("metrics", (step, values)))
        if row.get("checkpoint"):
            self._queue.put(("tags", ({"shipyard.checkpoint": str(row["checkpoint"])},)))
            self._queue.put(("flush", ()))
            self._queue.put(("save", (step,)))

    def tag(self, tags: dict[str, str]) -> None:
        self._queue.put(("tags", (tags,)))

    def wait(self, timeout_s: float = 60.0) -> None:
        """Until everything asked so far is done (the MLflow run exists, say)."""
        done = threading.Event()
        self._queue.put(("done", (done,)))
        done.wait(timeout_s)

    def close(self, status: str, timeout_s: float = 60.0) -> None:
        """Finish every tracker (FINISHED, KILLED or FAILED) and save the record."""
        self._queue.put(("close", (status,)))
        self._queue.put(("save", (self.last_step,)))
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._warn(f"tracking: still writing after {timeout_s:.0f} s; left behind")

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            action, args = item
            if action == "done":
                args[0].set()
                continue
            if action == "save":
                self._guarded("tracking record", lambda args=args: self._save_record(*args))
                continue
            for tracker in list(self.trackers):
                method = getattr(tracker, action)
                if not self._guarded(tracker.name, lambda m=method, a=args: m(*a)):
                    self.trackers.remove(tracker)

    def _guarded(self, name: str, work: Callable[[], None]) -> bool:
        try:
            work()
            return True
        except Exception as error:  # any backend failure: warn once, keep training
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self._warn(
                f"{name} failed ({type(error).__name__}: {first_line[:300]}); it records "
                "nothing more for this run. The metrics stay in metrics.jsonl."
            )
            return False


def read_record(location: str) -> dict[str, Any]:
    """A run's tracking record ({} if none, or if it is unreadable)."""
    text = open_store(location).get_text(RECORD_FILE)
    try:
        record = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def write_record(location: str, record: dict[str, Any]) -> None:
    open_store(location).put_text(RECORD_FILE, json.dumps(record, indent=2))


def flatten(document: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec data as dotted keys and text values (MLflow params)."""
    if isinstance(document, dict):
        flat: dict[str, str] = {}
        for key, value in document.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    value = document if isinstance(document, str) else json.dumps(document)
    return {prefix.rstrip("."): value}


def job_params(job: JobSpec, plan_summary: dict[str, Any]) -> dict[str, str]:
    """The flattened spec, the plan's summary and the versions that ran it."""
    from importlib import metadata

    params = flatten(job.model_dump(mode="json", exclude={"serve", "sweep"}))
    params.update(flatten(plan_summary, "plan."))
    for package in ("shipyard", "torch", "ray", "deepspeed", "transformers"):
        try:
            params[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return params
