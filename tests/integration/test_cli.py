"""The CLI as a user runs it: train live, Ctrl-C, clean shutdown, resume; serve until SIGTERM;
submit jobs to a local Ray head through the Jobs API and follow, list and stop them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from shipyard.lock import LOCKS_FOLDER
from shipyard.models.gpt.generation import GenerationRequest, TextGenerator
from shipyard.runtime.local import free_port
from shipyard.serve.export import export_folder, load_exported_model, read_export
from shipyard.spec.load import load_job
from shipyard.train.checkpoint import saved_checkpoints
from tests.conftest import REPO
from tests.integration.conftest import (
    SHIPYARD,
    TINY_JOB,
    TINY_LLAMA,
    cluster_up,
    wait_for,
    without_ray_address,
)

pytestmark = pytest.mark.integration

RAY_DAEMONS = {"raylet", "gcs_server"}
LOCAL_CLUSTER = REPO / "cluster" / "local.yaml"


def ray_daemons() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in RAY_DAEMONS}


@dataclass(frozen=True)
class CliRun:
    """A job trained by `shipyard train` as a user runs it: Ctrl-C, then the same command."""

    job_path: Path
    storage: Path
    port: int  # the job's serve port
    first_exit: int
    interrupted_at: int  # the step of the last checkpoint before Ctrl-C
    daemons_left_after_ctrl_c: bool
    rerun: subprocess.CompletedProcess
    daemons_left_after_rerun: bool


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> CliRun:
    """Train with the CLI on its embedded Ray, Ctrl-C once the first checkpoint is saved, and
    run the same command again to finish; the model it leaves is the one the serve tests use."""
    folder = tmp_path_factory.mktemp("cli-run")
    storage, port = folder / "runs", free_port()
    train = {**TINY_JOB["train"], "max_steps": 40, "log_every": 5}
    train.update(checkpoint_every=10, eval_every=20)
    serve = {"port": port, "num_replicas": 1, "cpus_per_replica": 0.25}
    spec = {**TINY_JOB, "name": "cli-run", "storage": str(storage), "train": train}
    job_path = folder / "cli-run.yaml"
    job_path.write_text(yaml.safe_dump({**spec, "serve": serve}))
    env = embedded_env()
    daemons_before = ray_daemons()
    first = subprocess.Popen(
        [*SHIPYARD, "train", str(job_path)],
        stdout=(folder / "first.log").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        wait_for(lambda: saved_checkpoints(str(storage), "cli-run"), 240, "a first checkpoint")
        first.send_signal(signal.SIGINT)
        first_exit = first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    interrupted_at = saved_checkpoints(str(storage), "cli-run")[-1].step
    deadline = time.monotonic() + 30
    while not ray_daemons() <= daemons_before and time.monotonic() < deadline:
        time.sleep(0.5)
    daemons_left = not ray_daemons() <= daemons_before

    rerun = subprocess.run(
        [*SHIPYARD, "train", str(job_path)], capture_output=True, text=True, env=env, timeout=400
    )
    return CliRun(
        job_path,
        storage,
        port,
        first_exit,
        interrupted_at,
        daemons_left,
        rerun,
        not ray_daemons() <= daemons_before,
    )


def test_ctrl_c_shuts_ray_down_and_a_rerun_resumes(cli_run):
    assert cli_run.first_exit == 130
    assert cli_run.interrupted_at < 40, "the run was really interrupted"
    assert not cli_run.daemons_left_after_ctrl_c, "the CLI's Ray daemons exited"

    second = cli_run.rerun
    assert second.returncode == 0, second.stdout + second.stderr
    assert "step 40 of 40" in second.stdout
    # Not a terminal: a whole line per log step, never a bar cut at 80 columns.
    assert "step 40/40  loss " in second.stdout and "training ━" not in second.stdout
    assert f"Resumed from the checkpoint at step {cli_run.interrupted_at}" in second.stdout
    final = saved_checkpoints(str(cli_run.storage), "cli-run")[-1]
    assert final.step == 40
    assert f"Checkpoint: {final.path}\n" in second.stdout, "no line is wrapped"
    assert final.metrics["val_loss"] < 4.5
    assert not cli_run.daemons_left_after_rerun


def saved_files(storage: Path) -> dict[Path, float]:
    """The run's files and their times (not the lock a run holds while it runs)."""
    return {
        p: p.stat().st_mtime
        for p in storage.rglob("*")
        if p.is_file() and LOCKS_FOLDER not in p.parts
    }


def test_a_changed_job_is_refused_and_the_checkpoint_kept(cli_run, tmp_path):
    """Resume is exact or refused: a changed model would corrupt the checkpoint, a changed
    seed or batch would silently train another run than the one that stopped."""
    job_path, storage = cli_run.job_path, cli_run.storage
    spec = yaml.safe_load(job_path.read_text())
    before = saved_files(storage)

    spec["model"]["width"] = 64
    spec["train"] |= {"seed": 12, "micro_batch_size": 2, "log_every": 2}  # log_every is free
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    daemons_before = ray_daemons()
    refused = subprocess.run(
        [*SHIPYARD, "train", str(changed)], capture_output=True, text=True, timeout=400
    )
    assert refused.returncode == 2
    changes = [line.strip() for line in refused.stderr.splitlines() if "differs" in line]
    assert changes == [
        "model.width: 64 differs from 32",
        "train.micro_batch_size: 2 differs from 4",
        "train.seed: 12 differs from 11",
        "plan.micro_batch_size: 2 differs from 4",
    ], refused.stderr
    assert "Traceback" not in refused.stderr
    assert saved_files(storage) == before
    assert ray_daemons() <= daemons_before, "refused before any Ray started"


def embedded_env() -> dict[str, str]:
    """This environment without RAY_ADDRESS: the CLI starts its own embedded Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def direct_answer(storage: Path, prompt: bytes, new_tokens: int) -> str:
    """What the latest export of cli-run generates greedily, computed in this process."""
    export = read_export(export_folder(saved_checkpoints(str(storage), "cli-run")[-1]))
    generator = TextGenerator(load_exported_model(export), export.model.sequence_length)
    tokens = generator.generate([GenerationRequest(tuple(prompt), new_tokens)])[0]
    return bytes(tokens).decode("utf-8", errors="replace")


def served_answer(url: str, prompt: str, max_tokens: int) -> str:
    """cli-run's greedy answer over HTTP (the OpenAI completions API)."""
    body = {"model": "cli-run", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_serve_runs_in_the_foreground_until_sigterm(cli_run, tmp_path):
    """Serve like `serve run`, answer over HTTP, stop cleanly on SIGTERM."""
    job_path, storage, port = cli_run.job_path, cli_run.storage, cli_run.port
    env = embedded_env()
    daemons_before = ray_daemons()
    log_path = tmp_path / "serve.log"
    server = subprocess.Popen(
        [*SHIPYARD, "serve", str(job_path)],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "Press Ctrl-C to stop" in log_path.read_text(), 240, "the server")
        answer = served_answer(url, "def ", 8)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, log_path.read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)

    assert answer == direct_answer(storage, b"def ", 8)
    assert "Stopped: Serve and Ray were shut down." in log_path.read_text()
    wait_for(lambda: ray_daemons() <= daemons_before, 30, "the server's Ray daemons to exit")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v1/health", timeout=5)
    config = yaml.safe_load((storage / "cli-run" / "serve_config.yaml").read_text())
    export = config["applications"][0]["args"]["export"]
    # The export lives beside the checkpoints, where Ray's pruning of checkpoints cannot reach.
    assert export == str(export_folder(saved_checkpoints(str(storage), "cli-run")[-1]))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate local Ray cluster, `shipyard cluster up cluster/local.yaml` (token
    authentication on), for this module's tests; `down` stops exactly it, where `ray stop`
    would stop every Ray. Yields its GCS address, dashboard URL and a runner of `shipyard`
    commands that find it by --cluster."""
    folder = tmp_path_factory.mktemp("ray-head")
    env = without_ray_address(SHIPYARD_CACHE=str(folder / "shipyard-cache"))

    def shipyard(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*SHIPYARD, *args], capture_output=True, text=True, env=env, timeout=timeout
        )

    with cluster_up(LOCAL_CLUSTER, folder) as (address, dashboard):
        yield address, dashboard, shipyard


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_serve_deploys_to_a_running_cluster_and_returns(cli_run, ray_head):
    job_path, storage, port = cli_run.job_path, cli_run.storage, cli_run.port
    # Ray sends the local token to an explicitly given address only when asked to.
    env = without_ray_address()

    address, dashboard, _ = ray_head

    def shipyard_serve(*flags: str) -> subprocess.CompletedProcess:
        command = [*SHIPYARD, "serve", str(job_path), "--address", address, *flags]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    deployed = shipyard_serve()
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "--shutdown" in deployed.stdout
    url = f"http://127.0.0.1:{port}"
    assert served_answer(url, "x", 5) == direct_answer(storage, b"x", 5)

    status = shipyard_serve("--status")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["status"], report["replicas"]) == ("RUNNING", {"RUNNING": 1})

    assert shipyard_serve("--shutdown").returncode == 0
    wait_for(
        lambda: requests.get(f"{url}/v1/health", timeout=5).status_code == 404,
        60,
        "the deleted app's route to go",
    )
    gone = shipyard_serve("--status")
    assert gone.returncode == 2
    assert "no Serve application named 'cli-run'" in gone.stderr

    # The Serve config file it wrote deploys the same app with Ray's own `serve deploy`.
    serve_cli = str(Path(sys.executable).parent / "serve")
    config = str(storage / "cli-run" / "serve_config.yaml")
    deployed_by_ray = subprocess.run(
        [serve_cli, "deploy", config, "--address", dashboard],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert deployed_by_ray.returncode == 0, deployed_by_ray.stdout + deployed_by_ray.stderr
    wait_for(lambda: shipyard_serve("--status").returncode == 0, 120, "`serve deploy`")
    wait_for(lambda: requests.get(f"{url}/v1/health", timeout=5).status_code == 200, 120, "the app")
    assert served_answer(url, "x", 5) == direct_answer(storage, b"x", 5)
    assert shipyard_serve("--shutdown").returncode == 0  # the head is shared with later tests


def write_cli_job(tmp_path, name: str, model: dict | None = None, **train) -> tuple:
    storage = tmp_path / "runs"
    spec = {**TINY_JOB, "name": name, "storage": str(storage), "model": model or TINY_JOB["model"]}
    spec["train"] = {**TINY_JOB["train"], **train}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, storage


def submitted_id(output: str) -> str:
    return re.search(r"Submitted (\S+) to", output)[1]


def test_a_submitted_job_is_followed_to_success_and_recorded(ray_head, tmp_path):
    """A tiny transformers Llama, submitted through Ray's Jobs API."""
    job_path, storage = write_cli_job(
        tmp_path,
        "submitted",
        model=TINY_LLAMA,
        max_steps=8,
        warmup_steps=2,
        checkpoint_every=8,
        eval_every=8,
    )
    head = ray_head[2]
    submitted = head("submit", str(job_path), "--cluster", str(LOCAL_CLUSTER), "--follow")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted_id(submitted.stdout)
    assert "step 8 of 8" in submitted.stdout, "the job's own output was followed"
    assert f"job {job_id}: SUCCEEDED" in submitted.stdout

    (checkpoint,) = saved_checkpoints(str(storage), "submitted")
    assert checkpoint.step == 8 and checkpoint.metrics["val_loss"] < 5.5
    record = storage / "submitted" / "submissions" / job_id
    job = load_job(job_path)
    assert yaml.safe_load((record / "job.yaml").read_text()) == job.model_dump(mode="json")
    assert json.loads((record / "plan.json").read_text()) == checkpoint.plan, "the plan it ran"
    facts = json.loads((record / "submission.json").read_text())
    assert facts["shipyard_version"] and "torch==2.13.0" in facts["requirements"]

    listed = head("jobs", "list", "--cluster", str(LOCAL_CLUSTER))
    assert f"{job_id}  SUCCEEDED" in listed.stdout, listed.stdout
    status = head("jobs", "status", job_id, "--cluster", str(LOCAL_CLUSTER))
    assert "SUCCEEDED" in status.stdout and "python -m shipyard train" in status.stdout
    logs = head("jobs", "logs", job_id, "--cluster", str(LOCAL_CLUSTER))
    assert "step 8 of 8" in logs.stdout


def test_a_running_job_is_stopped(ray_head, tmp_path):
    job_path, storage = write_cli_job(tmp_path, "endless", max_steps=100_000, checkpoint_every=1000)
    head = ray_head[2]
    submitted = head("submit", str(job_path), "--cluster", str(LOCAL_CLUSTER))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted_id(submitted.stdout)

    def running() -> bool:
        logs = head("jobs", "logs", job_id, "--cluster", str(LOCAL_CLUSTER)).stdout
        return "endless" in logs and "data parallel" in logs  # the command's plan line

    wait_for(running, 300, "the job's command to start")
    started = time.monotonic()
    stopped = head("jobs", "stop", job_id, "--cluster", str(LOCAL_CLUSTER))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"job {job_id}: STOPPED" in stopped.stdout
    assert time.monotonic() - started < 120
    status = head("jobs", "status", job_id, "--cluster", str(LOCAL_CLUSTER))
    assert "STOPPED" in status.stdout
    assert not saved_checkpoints(str(storage), "endless"), "stopped long before step 1000"


def test_a_bad_spec_is_refused_here_and_nothing_is_sent(ray_head, tmp_path):
    head = ray_head[2]
    before = head("jobs", "list", "--cluster", str(LOCAL_CLUSTER)).stdout
    count = int(re.search(r"(\d+) jobs", before)[1])
    job_path, _ = write_cli_job(tmp_path, "bad", micro_batch_size=0)
    refused = head("submit", str(job_path), "--cluster", str(LOCAL_CLUSTER))
    assert refused.returncode == 2
    assert "train.micro_batch_size" in refused.stderr and "Traceback" not in refused.stderr
    after = head("jobs", "list", "--cluster", str(LOCAL_CLUSTER)).stdout
    assert int(re.search(r"(\d+) jobs", after)[1]) == count
