"""The two trackers: an MLflow run (any tracking URI), and TensorBoard event files.

Each runs only on the tracking thread (see tracking/record.py), so neither needs a lock.
Stores that live on S3 are kept in a folder on this machine and uploaded whenever a checkpoint
is reported and when the run ends: MLflow's default SQLite file, and the event files.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from shipyard.storage import is_remote, local_mirror, open_store
from shipyard.tracking.record import Tracker

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param's value
BATCH = 100  # MLflow takes at most 1000 metrics and 100 params per batch


class Mirror:
    """A local folder that stands for `location` (itself when local; a copy of an S3 prefix)."""

    def __init__(self, location: str):
        self.location = location
        self.folder = local_mirror(location) if is_remote(location) else Path(location)

    def pull(self, name: str) -> None:
        """Bring `name` down from S3, which is the truth: a run continued elsewhere wrote it,
        and a copy here that S3 lacks belongs to a location since deleted."""
        if not is_remote(self.location):
            return
        store = open_store(self.location)
        if store.keys(name):
            store.download(name, self.folder / name)
        else:
            (self.folder / name).unlink(missing_ok=True)

    def reset(self) -> None:
        """Start the local copy of an S3 prefix empty: what S3 has stays there, and only
        files written from now on are uploaded from here."""
        if is_remote(self.location):
            shutil.rmtree(self.folder, ignore_errors=True)

    def push(self) -> None:
        """Upload every file of the folder to S3 (nothing to do when local)."""
        if not is_remote(self.location):
            return
        store = open_store(self.location)
        for path in sorted(self.folder.rglob("*")):
            if path.is_file():
                store.upload(path, path.relative_to(self.folder).as_posix())


def default_mlflow_uri(location: str) -> tuple[str, Mirror]:
    """An SQLite store in `location` (a folder, or a local copy of an S3 prefix)."""
    mirror = Mirror(location)
    mirror.folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(mirror.folder / 'mlflow.db').resolve()}", mirror


class MlflowTracker(Tracker):
    """One MLflow run: created once, continued by id ever after."""

    name = "MLflow"

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None,
        parent_run_id: str | None,
        on_run_id: Callable[[str], None],
        mirror: Mirror | None = None,
    ):
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.on_run_id = on_run_id
        self.mirror = mirror
        self.client = None

    def start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # a new store's migrations are not news to a user
            logging.getLogger(name).setLevel(logging.WARNING)
        if self.mirror:
            self.mirror.pull("mlflow.db")
        self.client = MlflowClient(tracking_uri=self.uri)
        if self.run_id and self._exists(self.run_id):
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self._create_run()
        self.on_run_id(self.run_id)
        present = self.client.get_run(self.run_id).data.params
        missing = [
            (key, value[:MAX_PARAM_LENGTH]) for key, value in params.items() if key not in present
        ]
        self._log_params(missing)
        self.tags(tags)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def flush(self) -> None:
        if self.mirror:
            self.mirror.push()

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
        self.flush()

    def last_step(self) -> int:
        """The last step this run holds a loss for (0 for none)."""
        history = self.client.get_metric_history(self.run_id, "loss")
        return max((metric.step for metric in history), default=0)

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def _create_run(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            experiment_id = self.client.create_experiment(self.experiment)
        else:
            experiment_id = experiment.experiment_id
        tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        return run.info.run_id

    def _log_params(self, params: list[tuple[str, str]]) -> None:
        from mlflow.entities import Param

        for first in range(0, len(params), BATCH):
            chunk = [Param(key, value) for key, value in params[first : first + BATCH]]
            self.client.log_batch(self.run_id, params=chunk)


class TensorBoardTracker(Tracker):
    """Scalars in TensorBoard event files, one folder per run (per trial in a sweep)."""

    name = "TensorBoard"

    def __init__(self, location: str):
        self.mirror = Mirror(location)
        self.writer = None

    def start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.mirror.reset()
        self.mirror.folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.mirror.folder))
        lines = [f"| {key} | {value} |" for key, value in sorted(params.items())]
        self.writer.add_text("params", "| param | value |\n|---|---|\n" + "\n".join(lines))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()
        self.mirror.push()

    def close(self, status: str) -> None:
        self.writer.close()
        self.mirror.push()


def quick_failing_http() -> None:
    """A tracking server that is down should cost seconds, not MLflow's minutes of retries
    (unless the user chose otherwise)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
