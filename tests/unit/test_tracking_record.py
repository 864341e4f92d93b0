"""Tracking without a backend: the spec, each step taken once, and a failing tracker dropped."""

from __future__ import annotations

import pytest

from shipyard.errors import SpecError
from shipyard.spec.job import JobSpec
from shipyard.spec.load import load_job
from shipyard.tracking.record import RunTracking, Tracker, flatten


class Recorder(Tracker):
    """What a backend was asked to do, in order; fails from `fail_at` on if given."""

    def __init__(self, name: str, fail_at: int | None = None):
        self.name = name
        self.fail_at = fail_at
        self.calls: list[tuple] = []

    def start(self, params, tags):
        self.calls.append(("start", params, tags))

    def metrics(self, step, values):
        if self.fail_at is not None and step >= self.fail_at:
            raise ConnectionError("server down\nmore lines")
        self.calls.append(("metrics", step, values))

    def tags(self, tags):
        self.calls.append(("tags", tags))

    def flush(self):
        self.calls.append(("flush",))

    def close(self, status):
        self.calls.append(("close", status))


def test_each_step_is_recorded_once_and_a_failing_tracker_is_dropped_with_one_warning():
    steady, failing = Recorder("steady"), Recorder("flaky", fail_at=8)
    warnings, saved = [], []
    tracking = RunTracking([steady, failing], 4, saved.append, warnings.append)
    tracking.start({"a": "1"}, {"t": "x"})
    for row in [
        {"step": 4, "loss": 9.0},  # at or before the record's last step: already recorded
        {"step": 8, "loss": 2.0, "lr": 0.1, "node_types": ["cpu"], "already_complete": False},
        {"step": 12, "loss": 1.5, "checkpoint": "/runs/x/checkpoint_1"},
        {"step": 8, "loss": 2.5},  # a restarted worker group trains step 8 again
        {"step": 16, "loss": 1.0},
    ]:
        tracking.record(row)
    tracking.close("FINISHED")
    metrics = [(call[1], call[2]) for call in steady.calls if call[0] == "metrics"]
    assert metrics == [(8, {"loss": 2.0, "lr": 0.1}), (12, {"loss": 1.5}), (16, {"loss": 1.0})]
    assert ("tags", {"shipyard.checkpoint": "/runs/x/checkpoint_1"}) in steady.calls
    assert steady.calls[-1] == ("close", "FINISHED")
    assert saved == [12, 16], "the record keeps the last step at checkpoints and at the end"
    assert len(warnings) == 1 and "flaky failed (ConnectionError: server down)" in warnings[0]
    assert ("close", "FINISHED") not in failing.calls, "a dropped tracker is left alone"


def test_flattened_params_use_dotted_keys_and_json_values():
    assert flatten({"train": {"lr": 0.1, "layers": [1, 2]}, "name": "x", "none": None}) == {
        "train.lr": "0.1",
        "train.layers": "[1, 2]",
        "name": "x",
        "none": "null",
    }


def test_tracking_is_on_by_default_and_each_part_can_be_switched(write_job):
    assert JobSpec(name="x").tracking.mlflow is not None
    job = load_job(write_job({"name": "x", "tracking": {"mlflow": False, "tensorboard": "tb/"}}))
    assert job.tracking.mlflow is None and job.tracking.tensorboard == "tb/"
    job = load_job(write_job({"name": "x", "tracking": {"mlflow": {"experiment": "e"}}}))
    assert job.tracking.mlflow.experiment == "e"
    with pytest.raises(SpecError, match=r"tracking\.mlflow\.tracking_url"):
        load_job(write_job({"name": "x", "tracking": {"mlflow": {"tracking_url": "http://x"}}}))
