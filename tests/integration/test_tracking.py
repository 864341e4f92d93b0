"""Runs recorded in MLflow and TensorBoard: the default stores and a real `mlflow server`.

A stopped and resumed run continues its own MLflow run with each step once; its metric
history and its TensorBoard scalars equal metrics.jsonl; a tracking server that dies mid-run
costs a warning, not the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shipyard.artifacts import push
from shipyard.runtime.local import free_port
from shipyard.spec.job import JobSpec
from shipyard.spec.load import validate
from shipyard.storage import open_store
from shipyard.tracking.record import read_record
from shipyard.train.trainer import run_training
from tests.integration.conftest import TINY_JOB, wait_for

pytestmark = pytest.mark.integration


def tracked_job(name: str, storage, tracking: dict | None = None) -> JobSpec:
    document = {
        **TINY_JOB,
        "name": name,
        "storage": str(storage),
        "tracking": tracking or {},
    }
    return validate(JobSpec, document, source=f"<test job {name}>")


def logged_rows(run_folder: Path) -> dict[int, dict]:
    """metrics.jsonl's rows by step (the first row of each step, as the trackers take them)."""
    rows = {}
    for line in (run_folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], row)
    return rows


def test_a_stopped_and_resumed_run_is_one_mlflow_run_and_one_tensorboard_curve(
    ray_session, tmp_path
):
    job = tracked_job("tracked", tmp_path / "runs")
    first = run_training(job, stop_at_step=12)
    second = run_training(job)
    assert second.final["step"] == 24 and second.final["resumed_from_step"] == 12

    run_folder = tmp_path / "runs" / "tracked"
    record = read_record(str(run_folder))
    client = MlflowClient(first.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [record["mlflow_run_id"]], "one run, continued"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "24"
    assert run.data.params["plan.data_parallel_size"] == "2"
    assert "version.torch" in run.data.params
    assert run.data.tags["shipyard.checkpoint"] == second.checkpoint_path

    rows = logged_rows(run_folder)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [
        (step, row["loss"]) for step, row in sorted(rows.items())
    ]
    val_history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val_history] == [s for s, r in sorted(rows.items()) if "val_loss" in r]

    events = EventAccumulator(second.tracking.tensorboard)
    events.Reload()
    scalars = [(event.step, event.value) for event in events.Scalars("loss")]
    assert [step for step, _ in scalars] == sorted(rows)
    assert [value for _, value in scalars] == pytest.approx(
        [r["loss"] for _, r in sorted(rows.items())]
    )
    assert any("mlflow ui --backend-store-uri sqlite:///" in c for c in second.tracking.commands())

    store = open_store(tmp_path / "models")
    published = push(job, store)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["shipyard.artifact"] == f"{store.uri}/tracked/{published.version}"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store, killed at the end."""
    port = free_port()
    store = tmp_path / "server.db"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store}",
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its web workers die with it
    )
    server.stop = lambda: os.killpg(server.pid, signal.SIGKILL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{url}/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(up, 120, "the MLflow server")
    server.url = url
    server.store = f"sqlite:///{store}"
    yield server
    if server.poll() is None:
        server.stop()
    server.wait()


def test_a_tracking_server_that_dies_mid_run_costs_a_warning_not_the_run(
    ray_session, tmp_path, mlflow_server, capfd
):
    job = tracked_job(
        "server-tracked",
        tmp_path / "runs",
        {"mlflow": {"tracking_uri": mlflow_server.url, "experiment": "shipyard-tests"}},
    )

    def kill_server_at_step_8(row: dict) -> None:
        if row.get("step") == 8:
            mlflow_server.stop()

    result = run_training(job, on_metrics=kill_server_at_step_8)
    assert result.final["step"] == 24, "training finished without its tracking server"
    assert "Warning: MLflow failed" in capfd.readouterr().err
    rows = logged_rows(tmp_path / "runs" / "server-tracked")
    assert max(rows) == 24, "every row is still in metrics.jsonl"
    client = MlflowClient(mlflow_server.store)  # what the server wrote before it died
    (run,) = client.search_runs([client.get_experiment_by_name("shipyard-tests").experiment_id])
    assert run.data.params["name"] == "server-tracked"
    # Whatever reached it before step 8 (the tracking thread may not have sent any yet).
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert set(steps) <= {4, 8}, steps
    events = EventAccumulator(result.tracking.tensorboard)
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == sorted(rows), "TensorBoard went on"
