"""Where Shipyard's checkpoints are and what they hold, read without starting Ray, from a
folder or an S3 location."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.storage import download_folder, is_remote, local_mirror, open_store

CHECKPOINT_TAG = "deepspeed"  # DeepSpeed's tag folder inside every Ray checkpoint
METADATA_FILE = "shipyard.json"  # job spec, plan and metrics, written by rank 0
TOKENIZER_FOLDER = "tokenizer"  # the run's tokenizer (none for bytes), written by rank 0
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's registry of a run

# Model fields a resumed run may change: they change the computation, not the saved state.
FREE_MODEL_FIELDS = ("dropout", "activation_checkpointing")
# Train fields whose change makes a saved DeepSpeed checkpoint unloadable (its sharding).
STATE_SHAPING_TRAIN_FIELDS = (
    "train.num_workers",
    "train.pipeline_stages",
    "train.tensor_parallel",
    "train.zero_stage",
)


def shapes_state(path: str) -> bool:
    """Whether the job field at dotted `path` shapes a checkpoint (every model field does but
    dropout and activation checkpointing: sizes, architecture, weights folder, factory)."""
    parts = path.split(".")
    if parts[0] == "model":
        return len(parts) < 2 or parts[1] not in FREE_MODEL_FIELDS
    return path in STATE_SHAPING_TRAIN_FIELDS


def state_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved value, new value) for every state-shaping field that differs between two
    dumped job specs."""
    changes = []
    fields = sorted({*saved.get("model", {}), *new.get("model", {})})
    paths = [f"model.{field}" for field in fields] + list(STATE_SHAPING_TRAIN_FIELDS)
    for path in paths:
        section, key = path.split(".")
        before, after = saved.get(section, {}).get(key), new.get(section, {}).get(key)
        if shapes_state(path) and before != after:
            changes.append((path, before, after))
    return changes


@dataclass(frozen=True)
class SavedCheckpoint:
    """One checkpoint folder of a job and the metadata saved beside it."""

    path: str  # a folder, or s3://bucket/prefix/job/checkpoint_…
    step: int
    job: dict[str, Any]
    plan: dict[str, Any]
    metrics: dict[str, Any]


def saved_checkpoints(storage: str, job_name: str) -> list[SavedCheckpoint]:
    """The job's checkpoints that Ray Train registered, oldest step first.

    A folder can exist that Ray never registered (the run stopped between upload and the
    controller's next poll); Ray will not resume from it, so neither do we list it.
    """
    store = open_store(storage)
    snapshot = store.get_text(f"{job_name}/{RAY_CHECKPOINT_SNAPSHOT}")
    if snapshot is None:
        return []
    found = []
    for entry in json.loads(snapshot).get("checkpoint_results", []):
        folder = f"{job_name}/{entry['checkpoint_dir_name']}"
        metadata = store.get_text(f"{folder}/{METADATA_FILE}")
        if metadata is not None:
            found.append(_saved(f"{store.uri}/{folder}", json.loads(metadata)))
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def latest_checkpoint(storage: str, job_name: str) -> SavedCheckpoint | None:
    """The checkpoint a re-run of the job resumes from, if any."""
    checkpoints = saved_checkpoints(storage, job_name)
    return checkpoints[-1] if checkpoints else None


def read_checkpoint(folder: str | Path) -> SavedCheckpoint:
    """The checkpoint in `folder` (or at s3://…), from the metadata rank 0 wrote beside
    DeepSpeed's files."""
    if is_remote(folder):
        text = open_store(folder).get_text(METADATA_FILE)
        if text is None:
            raise FileNotFoundError(f"{folder}/{METADATA_FILE}")
        return _saved(str(folder).rstrip("/"), json.loads(text))
    return _saved(str(folder), json.loads((Path(folder) / METADATA_FILE).read_text()))


def run_folder(storage: str, job_name: str) -> Path:
    """The job's folder on this machine: its metrics log, serve config and checkpoints (with
    S3 storage: the checkpoints downloaded from it)."""
    return local_mirror(storage) / job_name


def local_copy(saved: SavedCheckpoint, folder: Path) -> SavedCheckpoint:
    """`saved` as a folder on this machine: itself, or downloaded (once) from S3 into `folder`."""
    if not is_remote(saved.path):
        return saved
    parent, _, name = saved.path.rpartition("/")
    target = folder / name
    if not (target / METADATA_FILE).is_file():
        download_folder(open_store(parent), name, target)
    return read_checkpoint(target)


def _saved(path: str, metadata: dict[str, Any]) -> SavedCheckpoint:
    return SavedCheckpoint(
        path=path,
        step=int(metadata["metrics"]["step"]),
        job=metadata["job"],
        plan=metadata["plan"],
        metrics=metadata["metrics"],
    )
