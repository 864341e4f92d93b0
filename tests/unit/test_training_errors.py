"""What a failed run says: the root cause a rank or Ray Train's controller raised."""

from __future__ import annotations

from ray.train.v2.api.exceptions import ControllerError

from shipyard.train.trainer import _worker_message


def test_a_controller_failure_names_its_root_cause():
    try:
        try:
            raise OSError("When uploading part for key 'runs/x/checkpoint_manager_snapshot.json'")
        except OSError as storage:
            raise RuntimeError("Failed to persist the checkpoint registry") from storage
    except RuntimeError as failure:
        error = ControllerError(failure)
    assert _worker_message(error) == (
        "Ray Train's controller: When uploading part for key "
        "'runs/x/checkpoint_manager_snapshot.json'"
    )


def test_a_rank_that_fails_validation_names_the_error_not_pydantics_footer():
    from pydantic import BaseModel, ValidationError, field_validator
    from ray.train.v2.api.exceptions import WorkerGroupError

    class Train(BaseModel):
        warmup_steps: int

        @field_validator("warmup_steps")
        @classmethod
        def short(cls, value: int) -> int:
            raise ValueError(f"train.warmup_steps: {value} is longer than train.max_steps 2")

    try:
        Train(warmup_steps=20)
    except ValidationError as failure:
        error = WorkerGroupError("Training failed", {1: failure})
    message = _worker_message(error)
    assert message.startswith("rank 1: Value error, train.warmup_steps: 20 is longer"), message
