"""Where Shipyard's checkpoints are and what they hold, read without starting Ray, from a
folder or an S3 location."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.errors import ShipyardError
from shipyard.storage import download_folder, is_remote, local_mirror, open_store, safe_relative

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

# What DeepSpeed pickles into its files besides tensors and plain containers: the loss scaler,
# the ZeRO stage and the addresses of its optimizer's flat fragments. Nothing else unpickles.
DEEPSPEED_PICKLED_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class CheckpointError(ShipyardError):
    """A checkpoint cannot be read safely: corrupt metadata, or code where weights should be."""


@contextmanager
def weights_only_loads(where: str) -> Iterator[None]:
    """Every `torch.load` inside, DeepSpeed's own (which ask for full unpickling) included,
    reads only tensors, plain containers and DEEPSPEED_PICKLED_CLASSES: torch's weights-only
    unpickler, forced through its environment switch, which it reads at every load. A file
    that holds anything else (code to run) is refused, naming `where`."""
    import importlib

    import torch

    allowed = [
        getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_PICKLED_CLASSES
    ]
    saved = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as error:
        unsupported = next(
            (line.strip() for line in str(error).splitlines() if "Unsupported" in line),
            "objects beyond tensors",
        )
        raise CheckpointError(
            f"{where}: a checkpoint file holds what loading would have to run ({unsupported}); "
            "Shipyard loads checkpoints weights-only and refused it. Only load checkpoints "
            "written by Shipyard runs you trust."
        ) from None
    finally:
        if saved is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = saved


def shapes_state(path: str) -> bool:
    """Whether the job field at dotted `path` shapes a checkpoint (every model field does but
    dropout and activation checkpointing: sizes, architecture, weights folder, factory)."""
    parts = path.split(".")
    if parts[0] == "model":
        return len(parts) < 2 or parts[1] not in FREE_MODEL_FIELDS
    return path in STATE_SHAPING_TRAIN_FIELDS


# Job fields a resumed run may change: where and how often it reports, evaluates, saves,
# serves and is tracked, and what it asks of each node. Every other field decides which batch
# comes next or how an update is computed: changed, the resumed run would not be the run that
# never stopped, so it is refused.
RESUME_FREE_FIELDS = (
    "name",
    "storage",
    "artifacts",
    "serve",
    "sweep",
    "tracking",
    "failure",
    "model.activation_checkpointing",  # recomputes the same activations
    "train.cpus_per_worker",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
)
# Plan fields that say where ranks run, not what they compute.
PLACEMENT_ONLY_PLAN_FIELDS = ("cpus_per_worker", "ranks", "estimate", "cluster", "select_nodes")


def resume_changes(
    saved: SavedCheckpoint, job: dict[str, Any], plan: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
    """(field, saved value, new value) for every difference between the checkpoint's job and
    plan and the ones about to resume it that would make the resumed run inexact. The plan
    matters for `parallelism: auto`, re-planned for another cluster or a new profile."""
    job, plan = json.loads(json.dumps(job)), json.loads(json.dumps(plan))  # as saved: lists
    changes = [
        (path, before, after)
        for path, before, after in _differences(saved.job, job)
        if not _resume_free(path, job)
    ]
    changes += [
        (f"plan.{path}", before, after)
        for path, before, after in _differences(saved.plan, plan)
        if path.split(".")[0] not in PLACEMENT_ONLY_PLAN_FIELDS
    ]
    return changes


def _resume_free(path: str, job: dict[str, Any]) -> bool:
    if path == "train.max_steps":  # a longer run is the same run only under a constant rate
        return job.get("train", {}).get("lr_schedule") == "constant"
    return any(path == free or path.startswith(f"{free}.") for free in RESUME_FREE_FIELDS)


def _differences(before: Any, after: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted paths where two JSON documents differ, with both values."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted({*before, *after}):
            child = f"{path}.{key}" if path else str(key)
            found += _differences(before.get(key), after.get(key), child)
        return found
    return [] if before == after else [(path, before, after)]


@dataclass(frozen=True)
class SavedCheckpoint:
    """One checkpoint folder of a job and the metadata saved beside it."""

    path: str  # a folder, or s3://bucket/prefix/job/checkpoint_…
    step: int
    job: dict[str, Any]
    plan: dict[str, Any]
    metrics: dict[str, Any]
    corpus: str | None = None  # the prepared corpus's key (content-hashed); older ones: None


def saved_checkpoints(storage: str, job_name: str) -> list[SavedCheckpoint]:
    """The job's checkpoints that Ray Train registered, oldest step first.

    A folder can exist that Ray never registered (the run stopped between upload and the
    controller's next poll); Ray will not resume from it, so neither do we list it.
    """
    store = open_store(storage)
    snapshot = store.get_text(f"{job_name}/{RAY_CHECKPOINT_SNAPSHOT}")
    if snapshot is None:
        return []
    where = f"{store.uri}/{job_name}/{RAY_CHECKPOINT_SNAPSHOT}"
    found = []
    for entry in _json(snapshot, where).get("checkpoint_results", []):
        name = safe_relative(str(entry.get("checkpoint_dir_name")), where)
        folder = f"{job_name}/{name}"
        metadata = store.get_text(f"{folder}/{METADATA_FILE}")
        if metadata is not None:
            found.append(_saved(f"{store.uri}/{folder}", metadata))
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
        return _saved(str(folder).rstrip("/"), text)
    return _saved(str(folder), (Path(folder) / METADATA_FILE).read_text())


def run_folder(storage: str, job_name: str) -> Path:
    """The job's folder on this machine: its metrics log, serve config and checkpoints (with
    S3 storage: the checkpoints downloaded from it)."""
    return local_mirror(storage) / job_name


def local_copy(saved: SavedCheckpoint, folder: Path) -> SavedCheckpoint:
    """`saved` as a folder on this machine: itself, or downloaded (once) from S3 into `folder`,
    named by its whole S3 location (sweep trials each have a `checkpoint_000003`)."""
    if not is_remote(saved.path):
        return saved
    parent, _, name = saved.path.rpartition("/")
    where = hashlib.sha256(saved.path.encode()).hexdigest()[:12]
    target = folder / "downloaded" / f"{name}-{where}"
    if not (target / METADATA_FILE).is_file():
        download_folder(open_store(parent), name, target)
    return read_checkpoint(target)


def _saved(path: str, text: str) -> SavedCheckpoint:
    """The checkpoint at `path` from its metadata file's `text`."""
    where = f"{path}/{METADATA_FILE}"
    metadata = _json(text, where)
    try:
        return SavedCheckpoint(
            path=path,
            step=int(metadata["metrics"]["step"]),
            job=dict(metadata["job"]),
            plan=dict(metadata["plan"]),
            metrics=dict(metadata["metrics"]),
            corpus=metadata.get("corpus"),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{where}: not a Shipyard checkpoint's metadata (missing or wrong {error}). The "
            "file is corrupt or was changed by hand; its checkpoint cannot be used."
        ) from None


def _json(text: str, where: str) -> dict[str, Any]:
    """The JSON object in `text`, or a CheckpointError naming the file it came from."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{where}: not valid JSON (line {error.lineno}: {error.msg}); the file is corrupt "
            "(a crash mid-write, or changed by hand)."
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: expected a JSON object, not {type(value).__name__}.")
    return value
