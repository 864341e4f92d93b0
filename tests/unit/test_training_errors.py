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
