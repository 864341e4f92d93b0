"""A run's first metrics row says how long it took to start, phase by phase."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shipyard.train.entry import hidden_module
from shipyard.train.trainer import _with_launch_time
from shipyard.train.worker import StartClock


def test_the_first_row_breaks_the_start_down_from_the_runs_call():
    clock = StartClock(created=100.0, entered=107.5, ready=111.0)
    row = {"step": 4, "loss": 2.0, **clock.breakdown(first_step_done=111.5)}
    started = _with_launch_time(row, began=95.0)
    assert started["start_launch_s"] == pytest.approx(5.0)  # call to rank 0's process
    assert started["start_imports_s"] == pytest.approx(7.5)
    assert started["start_setup_s"] == pytest.approx(3.5)
    assert started["start_first_step_s"] == pytest.approx(0.5)
    assert started["start_s"] == pytest.approx(16.5)  # call to the first step done
    assert "start_created_at" not in started  # a moment on one clock, not a duration
    assert row["start_created_at"] == 100.0  # the worker's row is left as it came


def test_later_rows_pass_unchanged():
    row = {"step": 8, "loss": 1.5}
    assert _with_launch_time(row, began=95.0) is row


def test_a_rank_imports_its_training_loop_without_mlflow():
    """DeepSpeed's autotuner would import MLflow (about 1 s of a core per rank per run); the
    rank's entry hides it while the loop and DeepSpeed import, and only then."""
    script = (
        "import sys\n"
        "from shipyard.train.entry import hidden_module\n"
        "with hidden_module('mlflow'):\n"
        "    import shipyard.train.worker\n"
        "assert 'deepspeed' in sys.modules and 'mlflow' not in sys.modules\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('mlflow')\n"  # the block is over: it can import again
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)


def test_a_module_already_imported_is_not_hidden():
    import json

    with hidden_module("json"):
        import json as again
    assert again is json
