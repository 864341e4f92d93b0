"""Where Shipyard's checkpoints are and what they hold, read without starting Ray."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_TAG = "deepspeed"  # DeepSpeed's tag folder inside every Ray checkpoint
METADATA_FILE = "shipyard.json"  # job spec, plan and metrics, written by rank 0
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's registry of a run

# Job fields whose change makes a saved DeepSpeed checkpoint unloadable (shapes or sharding).
STATE_SHAPING_FIELDS = (
    "model.layers",
    "model.heads",
    "model.width",
    "model.sequence_length",
    "model.vocabulary_size",
    "train.num_workers",
    "train.pipeline_stages",
    "train.zero_stage",
)


@dataclass(frozen=True)
class SavedCheckpoint:
    """One checkpoint folder of a job and the metadata saved beside it."""

    path: Path
    step: int
    job: dict[str, Any]
    plan: dict[str, Any]
    metrics: dict[str, Any]


def saved_checkpoints(storage: str, job_name: str) -> list[SavedCheckpoint]:
    """The job's checkpoints that Ray Train registered, oldest step first.

    A folder can exist that Ray never registered (the run stopped between upload and the
    controller's next poll); Ray will not resume from it, so neither do we list it.
    """
    run = Path(storage, job_name)
    snapshot = run / RAY_CHECKPOINT_SNAPSHOT
    if not snapshot.is_file():
        return []
    registered = json.loads(snapshot.read_text()).get("checkpoint_results", [])
    found = []
    for entry in registered:
        folder = run / entry["checkpoint_dir_name"]
        if (folder / METADATA_FILE).is_file():
            found.append(read_checkpoint(folder))
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def latest_checkpoint(storage: str, job_name: str) -> SavedCheckpoint | None:
    """The checkpoint a re-run of the job resumes from, if any."""
    checkpoints = saved_checkpoints(storage, job_name)
    return checkpoints[-1] if checkpoints else None


def read_checkpoint(folder: str | Path) -> SavedCheckpoint:
    """The checkpoint in `folder`, from the metadata rank 0 wrote beside DeepSpeed's files."""
    folder = Path(folder)
    metadata = json.loads((folder / METADATA_FILE).read_text())
    return SavedCheckpoint(
        path=folder,
        step=int(metadata["metrics"]["step"]),
        job=metadata["job"],
        plan=metadata["plan"],
        metrics=metadata["metrics"],
    )
