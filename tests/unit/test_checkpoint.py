"""Listing a job's checkpoints the way Ray Train will resume them."""

from __future__ import annotations

import json
from pathlib import Path

from shipyard.train.checkpoint import (
    METADATA_FILE,
    RAY_CHECKPOINT_SNAPSHOT,
    latest_checkpoint,
    saved_checkpoints,
)


def make_checkpoint(run: Path, folder: str, step: int) -> None:
    (run / folder).mkdir(parents=True)
    metadata = {"job": {"name": "j"}, "plan": {}, "metrics": {"step": step}}
    (run / folder / METADATA_FILE).write_text(json.dumps(metadata))


def register(run: Path, *folders: str) -> None:
    results = [{"checkpoint_dir_name": folder, "metrics": {}} for folder in folders]
    (run / RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps({"checkpoint_results": results}))


def test_only_registered_checkpoints_count(tmp_path):
    run = tmp_path / "j"
    make_checkpoint(run, "checkpoint_b", 20)
    make_checkpoint(run, "checkpoint_a", 10)
    make_checkpoint(run, "checkpoint_c", 30)  # uploaded, but the run stopped before Ray knew
    register(run, "checkpoint_b", "checkpoint_a")
    assert [c.step for c in saved_checkpoints(str(tmp_path), "j")] == [10, 20]
    assert latest_checkpoint(str(tmp_path), "j").path == str(run / "checkpoint_b")


def test_no_run_means_no_checkpoint(tmp_path):
    assert saved_checkpoints(str(tmp_path), "nothing") == []
    assert latest_checkpoint(str(tmp_path), "nothing") is None
