"""`shipyard train` as a user runs it: live run, Ctrl-C, clean shutdown, resume, summary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from shipyard.train.checkpoint import saved_checkpoints
from tests.integration.conftest import TINY_JOB

pytestmark = pytest.mark.integration

SHIPYARD = [sys.executable, "-m", "shipyard"]
RAY_DAEMONS = {"raylet", "gcs_server"}


def ray_daemons() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in RAY_DAEMONS}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def cli_job(tmp_path: Path) -> tuple[Path, Path]:
    storage = tmp_path / "runs"
    train = {
        **TINY_JOB["train"],
        "max_steps": 40,
        "log_every": 5,
        "checkpoint_every": 10,
        "eval_every": 20,
    }
    spec = {**TINY_JOB, "name": "cli-run", "storage": str(storage), "train": train}
    path = tmp_path / "cli-run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, storage


def test_ctrl_c_shuts_ray_down_and_a_rerun_resumes(cli_job, tmp_path):
    job_path, storage = cli_job
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    daemons_before = ray_daemons()
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [*SHIPYARD, "train", str(job_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        wait_for(lambda: saved_checkpoints(str(storage), "cli-run"), 240, "a first checkpoint")
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    interrupted_at = saved_checkpoints(str(storage), "cli-run")[-1].step
    assert interrupted_at < 40, "the run was really interrupted"
    wait_for(lambda: ray_daemons() <= daemons_before, 30, "the CLI's Ray daemons to exit")

    second = subprocess.run(
        [*SHIPYARD, "train", str(job_path)], capture_output=True, text=True, env=env, timeout=400
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "step 40 of 40" in second.stdout
    assert f"Resumed from the checkpoint at step {interrupted_at}" in second.stdout
    final = saved_checkpoints(str(storage), "cli-run")[-1]
    assert final.step == 40
    assert str(final.path) in second.stdout.replace("\n", "")
    assert final.metrics["val_loss"] < 4.5
    assert ray_daemons() <= daemons_before


def test_changed_model_is_refused_and_the_checkpoint_kept(cli_job):
    job_path, storage = cli_job
    spec = yaml.safe_load(job_path.read_text())
    spec["train"]["max_steps"] = 10
    job_path.write_text(yaml.safe_dump(spec))
    assert (
        subprocess.run(
            [*SHIPYARD, "train", str(job_path)], capture_output=True, timeout=400
        ).returncode
        == 0
    )
    before = {p: p.stat().st_mtime for p in storage.rglob("*") if p.is_file()}

    spec["model"]["width"] = 64
    job_path.write_text(yaml.safe_dump(spec))
    refused = subprocess.run(
        [*SHIPYARD, "train", str(job_path)], capture_output=True, text=True, timeout=400
    )
    assert refused.returncode == 2
    assert "model.width: 64 differs from 32 in the checkpoint" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert {p: p.stat().st_mtime for p in storage.rglob("*") if p.is_file()} == before
