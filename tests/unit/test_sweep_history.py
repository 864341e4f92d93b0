"""The sweep's own result history: what the driver appends is what the report reads back."""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

from shipyard.sweep.history import HISTORY_FILE, TrialHistory, by_trial, read_history


def test_rows_come_back_in_order_grouped_by_trial(tmp_path):
    # Tune pickles its callbacks with the experiment and restores them on resume.
    history = pickle.loads(pickle.dumps(TrialHistory(tmp_path, ["train.lr"])))
    reports = [("a", 8, 5.0), ("b", 8, 4.0), ("a", 16, math.nan), ("b", 16, 3.5)]
    for trial_id, step, loss in reports:
        trial = SimpleNamespace(trial_id=trial_id, config={"train.lr": 2e-3})  # exploited since
        ran_with = {"train.lr": 1e-3, "other": [1]}
        result = {"step": step, "val_loss": loss, "config": ran_with, "ids": [1, 2]}
        history.on_trial_result(0, [], trial, result)

    rows = read_history(tmp_path)
    assert [(row["trial_id"], row["step"]) for row in rows] == [(t, s) for t, s, _ in reports]
    assert rows[0]["config"] == {"train.lr": 1e-3}  # the swept values the result came from
    assert "ids" not in rows[0]  # non-scalars are left out
    assert math.isnan(rows[2]["val_loss"])
    assert [row["step"] for row in by_trial(rows)["b"]] == [8, 16]


def test_a_partial_last_line_is_skipped(tmp_path):
    (tmp_path / HISTORY_FILE).write_text('{"trial_id": "a", "step": 1}\n{"trial_id": "a", "st')
    assert read_history(tmp_path) == [{"trial_id": "a", "step": 1}]
    assert read_history(tmp_path / "missing") == []


def test_a_restored_history_writes_where_this_machine_mirrors_s3(tmp_path, monkeypatch):
    """A sweep on S3 resumed on another machine (another SHIPYARD_CACHE): the history that
    Tune unpickles appends to that machine's mirror, not to a path of the first machine."""
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path / "first"))
    saved = pickle.dumps(TrialHistory("s3://bucket/runs/job-sweep", ["train.lr"]))
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path / "second"))
    trial = SimpleNamespace(trial_id="a", config={"train.lr": 1e-3})
    pickle.loads(saved).on_trial_result(0, [], trial, {"step": 8, "val_loss": 4.0})
    assert not (tmp_path / "first").exists()
    rows = read_history(tmp_path / "second" / "s3" / "bucket" / "runs" / "job-sweep")
    assert [(row["trial_id"], row["step"]) for row in rows] == [("a", 8)]
