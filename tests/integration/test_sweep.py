"""Sweeps on real Ray Tune: every trial a 2-worker DeepSpeed run on the session's Ray."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import yaml
from ray.util.state import list_actors, list_placement_groups

from shipyard.runtime.local import POOL_WARNING
from shipyard.serve.export import export_checkpoint, load_exported_model
from shipyard.spec.job import JobSpec
from shipyard.spec.load import validate
from shipyard.storage import open_store
from shipyard.sweep.history import by_trial, read_history
from shipyard.sweep.report import TrialTable
from shipyard.sweep.search_space import check_sweep
from shipyard.sweep.tuner import run_sweep, sweep_folder
from shipyard.train.checkpoint import local_copy, read_checkpoint
from shipyard.train.schedule import lr_factor
from tests.integration.conftest import (
    TINY_JOB,
    TINY_LLAMA,
    validation_loss,
    wait_for,
    without_ray_address,
)

pytestmark = pytest.mark.integration

# The actors a sweep starts; none may outlive it.
SWEEP_ACTORS = {
    "ImplicitFunc",
    "TrainController",
    "RayTrainWorker",
    "PlacementGroupCleaner",
    "_QueueActor",
    "DatasetManager",
    "RankPool",
    "WarmRank",
}


def sweep_job(
    name: str, storage, sweep: dict, model: dict | None = None, tracking=None, **train
) -> JobSpec:
    """TINY_JOB (or its `model` instead) checkpointed and evaluated every 8 steps, with 0.45
    CPU per worker so two 2-worker trials (and their own small actors) fit on 2 cores at once."""
    train = {
        **TINY_JOB["train"],
        "eval_every": 8,
        "checkpoint_every": 8,
        "cpus_per_worker": 0.45,
        **train,
    }
    document = {**TINY_JOB, "name": name, "storage": str(storage), "train": train, "sweep": sweep}
    if model:
        document["model"] = model
    if tracking is not None:
        document["tracking"] = tracking
    return validate(JobSpec, document, source=f"<test job {name}>")


def test_interrupted_asha_sweep_on_s3_resumes_elsewhere_and_reports_its_best(
    ray_session, s3, tmp_path
):
    """`shipyard sweep` as a user runs it, with `storage: s3://…` and ASHA's `promotion: pause`:
    Ctrl-C once the third trial has paused at its first rung, then run it again as another
    machine would (an empty SHIPYARD_CACHE).

    Four trials, lr 1e-5, 3e-3, 3e-5, 1e-4, one at a time; rungs at steps 8 and 16 keep the top
    half. The first arrival (1e-5) pauses at step 8 and, unlike under Tune's percentile rule,
    never goes on: every later trial beats it. 3e-3 goes straight past step 8 and waits at 16;
    after the resume, 1e-4 passes step 8 but ranks below it at 16, so 3e-3 resumes from its
    own step-16 checkpoint and is the one trial trained to the end. That needs the rungs'
    results from before the interrupt: without them the resumed sweep would train the paused
    trials on. The report on S3 must rank all four with the history of both runs, and the best
    checkpoint, on S3, must evaluate to the metric it reports. Each run starts its own embedded
    Ray, as `shipyard sweep` does, so its trials see this S3 server's settings (the session's
    Ray is for the evaluation).
    """
    job = sweep_job(
        "cli-asha",
        f"{s3}/runs",
        {
            "space": {"train.lr": {"grid": [1e-5, 3e-3, 3e-5, 1e-4]}},
            "num_samples": 1,
            "max_concurrent_trials": 1,
            "scheduler": "asha",
            "asha": {"grace_period": 8, "reduction_factor": 2, "promotion": "pause"},
        },
    )
    job_path = tmp_path / "cli-asha.yaml"
    job_path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    command = [sys.executable, "-m", "shipyard", "sweep", str(job_path)]
    mirror = f"s3/{s3.removeprefix('s3://')}/runs/cli-asha-sweep"

    def third_trial_paused() -> bool:
        rows = read_history(tmp_path / "first-machine" / mirror)
        return any(row["config"]["train.lr"] == 3e-5 for row in rows)

    first_log = tmp_path / "first.log"
    first = subprocess.Popen(
        command,
        stdout=first_log.open("w"),
        stderr=subprocess.STDOUT,
        env=without_ray_address(SHIPYARD_CACHE=str(tmp_path / "first-machine")),
        start_new_session=True,
    )
    try:
        wait_for(third_trial_paused, 300, "the third trial at its first rung")
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130, first_log.read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert "Interrupted with" in first_log.read_text()

    second_machine = tmp_path / "second-machine"
    second = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=without_ray_address(SHIPYARD_CACHE=str(second_machine)),
        timeout=600,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stdout
    for printed in (first_log.read_text(), second.stdout):  # Ray's advice for other programs
        assert POOL_WARNING not in printed

    histories = by_trial(read_history(second_machine / mirror))  # both runs' rows
    lr_of = {trial: rows[0]["config"]["train.lr"] for trial, rows in histories.items()}
    trained = {lr_of[trial]: [row["step"] for row in rows] for trial, rows in histories.items()}
    assert trained == {1e-5: [8], 3e-3: [8, 16, 24], 3e-5: [8], 1e-4: [8, 16]}
    for trial, lr in lr_of.items():
        if lr in (1e-5, 3e-5):  # paused at step 8 for good: never run again
            assert f"trial {trial} resumed" not in second.stdout, f"{trial} was run again"
    best = next(trial for trial, lr in lr_of.items() if lr == 3e-3)
    assert f"trial {best} resumed (last reported step 16)" in second.stdout
    assert histories[best][-1]["resumed_from_step"] == 16

    sweep = open_store(f"{s3}/runs/cli-asha-sweep")
    rows = list(csv.DictReader(io.StringIO(sweep.get_text("results.csv"))))
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    assert [row["status"] for row in rows].count("stopped early") == 3
    best_row = rows[0]
    assert (best_row["trial_id"], best_row["status"]) == (best, "completed")
    assert float(best_row["best_val_loss"]) == min(float(row["best_val_loss"]) for row in rows)

    best_metric = float(best_row["best_val_loss"])
    assert f"val_loss {best_metric:.4f}" in second.stdout
    checkpoint = re.search(r"checkpoint: (\S+)", second.stdout)[1]
    assert checkpoint.startswith(f"{s3}/runs/cli-asha-sweep/")
    best_job = JobSpec.model_validate(yaml.safe_load(sweep.get_text("best.yaml")))
    assert best_job.train.lr == float(best_row["train.lr"])
    saved = local_copy(read_checkpoint(checkpoint), tmp_path / "best")
    model = load_exported_model(export_checkpoint(saved))
    assert validation_loss(model, best_job) == pytest.approx(best_metric, rel=1e-4)
    sweep.download("metric_by_step.png", tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    # Trials' Train runs were scratch: nothing of them is left on S3.
    assert not sweep.keys("trial-runs/"), "the trials' scratch runs were left on S3"


def test_pbt_continues_a_weak_trial_from_a_strong_ones_checkpoint(ray_session, tmp_path):
    """Two trials of a tiny transformers Llama, lr 3e-3 and 1e-5: at the perturbation at step
    8 the weak one takes the strong one's checkpoint and goes on with its own (perturbed) lr;
    nothing of the sweep is left running. Synchronous PBT: the trial ahead waits at step 8 for
    the other, so the exploit does not depend on how far apart Ray started them."""
    job = sweep_job(
        "pbt",
        tmp_path,
        {
            "space": {"train.lr": {"grid": [3e-3, 1e-5]}},
            "num_samples": 1,
            "scheduler": "pbt",
            "pbt": {"perturbation_interval": 8, "quantile_fraction": 0.5, "synch": True},
        },
        model=TINY_LLAMA,
        tracking={},  # the default MLflow store and TensorBoard folders
        max_steps=12,  # one perturbation, then 4 steps of the exploited checkpoint
        eval_every=4,
        checkpoint_every=4,
        keep_checkpoints=1,  # Tune copies each before Train's own pruning may remove it
    )
    address = ray_session.get_runtime_context().gcs_address
    alive_before = {a.actor_id for a in list_actors(address=address) if a.state == "ALIVE"}
    dimensions = check_sweep(job, "<test>")
    _, grid, unfinished = run_sweep(
        job, dimensions, callbacks=[TrialTable("val_loss", ["train.lr"], job.train.max_steps)]
    )
    assert grid.num_errors == 0, [str(result.error) for result in grid]
    assert unfinished == []

    rows = read_history(sweep_folder(job))  # in the order the driver received them
    continued = [
        (index, row)
        for index, row in enumerate(rows)
        if row["started_from_trial"] and row["started_from_trial"] != row["trial_id"]
    ]
    assert continued, "no trial was seen continuing another trial's checkpoint"
    index, first = continued[0]  # the first exploit: the weak trial takes the strong one's
    own_before = [row["val_loss"] for row in rows[:index] if row["trial_id"] == first["trial_id"]]
    assert first["resumed_from_step"] >= 8, "it started from a checkpoint, not from scratch"
    assert own_before, "the weak trial reported on its own before the exploit"
    # The donor's weights came along: far better than the weak trial ever was on its own.
    assert first["val_loss"] < min(own_before) - 0.2
    # ...and each run's own lr, not the one saved in the donor's checkpoint, drives the schedule
    # (rows of a checkpoint that had nothing left to train repeat its saved metrics).
    for row in rows:
        if not row.get("already_complete"):
            expected = row["config"]["train.lr"] * lr_factor(row["step"], job.train)
            assert math.isclose(row["lr"], expected, rel_tol=1e-6), (row["step"], row["lr"])

    assert_tracked_as_parent_and_children(job, rows)

    # Every run trained on the sweep's two warm gangs: only their first runs imported anything;
    # and the restarts reused paused trials' Tune actors (Tune's `pid` is the trial actor's).
    starts = [row for row in rows if "start_imports_s" in row]
    assert len(starts) == len({row["trial_run"] for row in rows}) > 2
    assert sum(row["start_imports_s"] > 0 for row in starts) == 2
    assert len({row["pid"] for row in rows}) < len(starts)

    leftover_groups = [
        group for group in list_placement_groups(address=address) if group.state != "REMOVED"
    ]
    assert not leftover_groups, leftover_groups
    leftover_actors = [
        actor.class_name
        for actor in list_actors(address=address)
        if actor.state == "ALIVE"
        and actor.actor_id not in alive_before
        and actor.class_name in SWEEP_ACTORS
    ]
    assert not leftover_actors, leftover_actors


def assert_tracked_as_parent_and_children(job: JobSpec, rows: list[dict]) -> None:
    """One MLflow run for the sweep and one child per trial with the trial's values; the
    exploit shows on the child that took another's checkpoint; TensorBoard has a folder per
    trial."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = sweep_folder(job)
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(job.name).experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("shipyard.kind") == "sweep"]
    children = [run for run in runs if run is not parent]
    trials = {row["trial_id"] for row in rows}
    assert {run.data.tags["shipyard.trial_id"] for run in children} == trials
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in children)
    assert {run.data.params["trial.train.lr"] for run in children} == {"0.003", "1e-05"}
    assert parent.data.tags["shipyard.best_trial"] in trials
    assert any(
        run.data.tags["shipyard.started_from_trial"] != run.data.tags["shipyard.trial_id"]
        and any("(PBT exploit)" in v for k, v in run.data.tags.items() if "restart_at" in k)
        for run in children
    ), "the exploit is on the record"
    for trial in trials:
        events = EventAccumulator(str(folder / "tensorboard" / trial))
        events.Reload()
        assert events.Scalars("val_loss"), trial
