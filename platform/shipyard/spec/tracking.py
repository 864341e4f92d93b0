"""The `tracking:` section of a job: where its runs are recorded besides metrics.jsonl.

    tracking:
      mlflow: {tracking_uri: http://127.0.0.1:5000, experiment: my-experiments}   # or false
      tensorboard: true              # or false, or a folder (local or s3://)

By default both are on and need no server: an MLflow store (SQLite) in the job's run folder
and TensorBoard event files in the run folder, S3 included.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from shipyard.spec.model import Strict


class MlflowSpec(Strict):
    """An MLflow tracking server or store, and the experiment runs are recorded under."""

    tracking_uri: str | None = Field(
        None,
        min_length=1,
        description="http(s)://server, or a store URI; default: SQLite in the run folder",
    )
    experiment: str | None = Field(None, min_length=1, description="default: the job's name")


class TrackingSpec(Strict):
    """MLflow and TensorBoard, each on (the default), off, or pointed somewhere."""

    mlflow: MlflowSpec | None = MlflowSpec()
    tensorboard: bool | str = Field(
        True, description="true: event files in the run folder; a folder or s3:// prefix"
    )

    @field_validator("mlflow", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        """`mlflow: true` is the default store, `mlflow: false` turns it off."""
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @field_validator("tensorboard")
    @classmethod
    def _folder_named(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not value.strip():
            raise ValueError("tracking.tensorboard: give true, false, or a folder")
        return value
