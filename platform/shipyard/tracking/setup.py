"""Which trackers a run gets, where they write, and how a user looks at what they wrote."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from shipyard.spec.job import JobSpec
from shipyard.storage import is_remote
from shipyard.tracking.backends import (
    MlflowTracker,
    TensorBoardTracker,
    default_mlflow_uri,
    quick_failing_http,
)
from shipyard.tracking.record import (
    RunContext,
    RunTracking,
    Tracker,
    read_record,
    write_record,
)


@dataclass(frozen=True)
class TrackingPlaces:
    """Where a run is tracked: the MLflow URI (or None) and TensorBoard folder (or None)."""

    mlflow_uri: str | None
    tensorboard: str | None

    def commands(self) -> list[str]:
        """How to look: `mlflow ui` and `tensorboard --logdir` for these places."""
        looks = []
        if self.mlflow_uri and self.mlflow_uri.startswith("sqlite:"):
            looks.append(f"mlflow ui --backend-store-uri {self.mlflow_uri}")
        elif self.mlflow_uri:
            looks.append(f"open {self.mlflow_uri} (MLflow)")
        if self.tensorboard:
            looks.append(f"tensorboard --logdir {self.tensorboard}")
        return looks


def run_location(job: JobSpec) -> str:
    """The run's folder or S3 prefix: where its checkpoints and records live."""
    return f"{job.storage.rstrip('/')}/{job.name}"


def open_tracking(
    job: JobSpec, params: dict[str, str], tags: dict[str, str], context: RunContext | None = None
) -> tuple[RunTracking | None, TrackingPlaces]:
    """The run's trackers, started (on their thread), continuing its record if it has one."""
    context = context or RunContext()
    tags = {**tags, **context.tags}
    if context.trial_id:
        tags["shipyard.trial_id"] = context.trial_id
        params = {**params, **{f"trial.{k}": str(v) for k, v in context.trial_values.items()}}
    record_location = context.record_location or run_location(job)
    record = read_record(record_location)
    trackers: list[Tracker] = []
    mlflow_uri = tensorboard = None
    spec = job.tracking
    if spec.mlflow is not None:
        mlflow_uri, mirror = _mlflow_place(job, context, record_location)
        if mlflow_uri.startswith("http"):
            quick_failing_http()

        def remember(run_id: str) -> None:
            write_record(record_location, {**read_record(record_location), "mlflow_run_id": run_id})

        trackers.append(
            MlflowTracker(
                mlflow_uri,
                experiment=context.experiment or spec.mlflow.experiment or job.name,
                run_name=context.trial_id or job.name,
                run_id=record.get("mlflow_run_id"),
                parent_run_id=context.parent_run_id,
                on_run_id=remember,
                mirror=mirror,
            )
        )
    if spec.tensorboard:
        tensorboard = context.tensorboard_folder or (
            spec.tensorboard if isinstance(spec.tensorboard, str) else None
        )
        tensorboard = tensorboard or f"{record_location}/tensorboard"
        trackers.append(TensorBoardTracker(tensorboard))
    places = TrackingPlaces(mlflow_uri, _shown(tensorboard))
    if not trackers:
        return None, places

    def save(step: int) -> None:
        write_record(record_location, {**read_record(record_location), "last_step": step})

    tracking = RunTracking(trackers, int(record.get("last_step", 0)), save, _warn)
    tracking.start(params, tags)
    return tracking, places


def _mlflow_place(job: JobSpec, context: RunContext, record_location: str):
    """The MLflow URI, and the local copy of an S3 location its default store needs."""
    uri = context.mlflow_uri or job.tracking.mlflow.tracking_uri
    if uri:
        return uri, None
    uri, mirror = default_mlflow_uri(record_location)
    return uri, mirror if is_remote(record_location) else None


def _shown(location: str | None) -> str | None:
    """A TensorBoard location as the user types it: a local folder in full."""
    if location is None or is_remote(location):
        return location
    return os.path.abspath(location)


def _warn(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr, flush=True)


def submission_tags() -> dict[str, Any]:
    """The Ray Jobs submission this run belongs to, when `shipyard submit` started it."""
    submission = os.environ.get("SHIPYARD_SUBMISSION_ID")
    return {"shipyard.submission_id": submission} if submission else {}


def tag_recorded_run(job: JobSpec, tags: dict[str, str]) -> None:
    """Tags on the job's MLflow run after it ended (the published artifact, say); a warning,
    not an error, if the run or its store cannot be reached."""
    run_id = read_record(run_location(job)).get("mlflow_run_id")
    if job.tracking.mlflow is None or not run_id:
        return
    from mlflow.tracking import MlflowClient

    uri, mirror = _mlflow_place(job, RunContext(), run_location(job))
    try:
        if mirror:
            mirror.pull("mlflow.db")
        client = MlflowClient(tracking_uri=uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        if mirror:
            mirror.push()
    except Exception as error:  # the store is down or gone: the artifact is published anyway
        _warn(f"MLflow: could not tag run {run_id} ({type(error).__name__}: {error})")
