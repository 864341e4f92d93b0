"""The CLI as a user runs it: train live, Ctrl-C, clean shutdown, resume; serve until SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from shipyard.runtime.local import free_port
from shipyard.serve.export import load_exported_model, read_export
from shipyard.serve.generation import GenerationRequest, TextGenerator
from shipyard.train.checkpoint import saved_checkpoints
from tests.conftest import REPO
from tests.integration.conftest import TINY_JOB, cluster_up, wait_for

pytestmark = pytest.mark.integration

SHIPYARD = [sys.executable, "-m", "shipyard"]
RAY_DAEMONS = {"raylet", "gcs_server"}


def ray_daemons() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in RAY_DAEMONS}


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


def test_changed_model_is_refused_and_the_checkpoint_kept(trained_for_serving, tmp_path):
    job_path, storage, _ = trained_for_serving
    spec = yaml.safe_load(job_path.read_text())
    before = {p: p.stat().st_mtime for p in storage.rglob("*") if p.is_file()}

    spec["model"]["width"] = 64
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    daemons_before = ray_daemons()
    refused = subprocess.run(
        [*SHIPYARD, "train", str(changed)], capture_output=True, text=True, timeout=400
    )
    assert refused.returncode == 2
    assert "model.width: 64 differs from 32 in the checkpoint" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert {p: p.stat().st_mtime for p in storage.rglob("*") if p.is_file()} == before
    assert ray_daemons() <= daemons_before, "refused before any Ray started"


@pytest.fixture(scope="module")
def trained_for_serving(tmp_path_factory) -> tuple[Path, Path, int]:
    """A job trained for a few steps by the CLI: (job spec path, storage, its serve port)."""
    folder = tmp_path_factory.mktemp("cli-serve")
    storage, port = folder / "runs", free_port()
    train = {**TINY_JOB["train"], "max_steps": 6, "warmup_steps": 2, "log_every": 3}
    train.update(checkpoint_every=6, eval_every=6)
    serve = {"port": port, "num_replicas": 1, "cpus_per_replica": 0.25}
    spec = {**TINY_JOB, "name": "cli-serve", "storage": str(storage), "train": train}
    job_path = folder / "cli-serve.yaml"
    job_path.write_text(yaml.safe_dump({**spec, "serve": serve}))
    trained = subprocess.run(
        [*SHIPYARD, "train", str(job_path)],
        capture_output=True,
        text=True,
        env=without_ray_address(),
        timeout=400,
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    return job_path, storage, port


def without_ray_address() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def direct_answer(storage: Path, prompt: bytes, new_tokens: int) -> list[int]:
    """What the latest export of cli-serve generates, computed in this process."""
    export = read_export(Path(saved_checkpoints(str(storage), "cli-serve")[-1].path, "export"))
    generator = TextGenerator(load_exported_model(export), export.model.sequence_length)
    return generator.generate([GenerationRequest(tuple(prompt), new_tokens)])[0]


def test_serve_runs_in_the_foreground_until_sigterm(trained_for_serving, tmp_path):
    """Serve like `serve run`, answer over HTTP, stop cleanly on SIGTERM."""
    job_path, storage, port = trained_for_serving
    env = without_ray_address()
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
        answer = requests.post(
            f"{url}/v1/generate", json={"prompt": "def ", "max_new_tokens": 8}, timeout=60
        ).json()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, log_path.read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)

    assert answer["tokens"] == direct_answer(storage, b"def ", 8)
    assert "Stopped: Serve and Ray were shut down." in log_path.read_text()
    wait_for(lambda: ray_daemons() <= daemons_before, 30, "the server's Ray daemons to exit")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v1/health", timeout=5)
    config = yaml.safe_load((storage / "cli-serve" / "serve_config.yaml").read_text())
    export = config["applications"][0]["args"]["export"]
    assert export == str(Path(saved_checkpoints(str(storage), "cli-serve")[-1].path, "export"))


@pytest.fixture
def ray_head(tmp_path):
    """A separate local Ray cluster, `shipyard cluster up cluster/local.yaml` (token
    authentication on); `down` stops exactly it, where `ray stop` would stop every Ray."""
    with cluster_up(REPO / "cluster" / "local.yaml", tmp_path) as head:
        yield head


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_serve_deploys_to_a_running_cluster_and_returns(trained_for_serving, ray_head):
    job_path, storage, port = trained_for_serving
    # Ray sends the local token to an explicitly given address only when asked to.
    env = {**without_ray_address(), "RAY_AUTH_MODE": "token"}

    address, dashboard = ray_head

    def shipyard_serve(*flags: str) -> subprocess.CompletedProcess:
        command = [*SHIPYARD, "serve", str(job_path), "--address", address, *flags]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    deployed = shipyard_serve()
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "--shutdown" in deployed.stdout
    url = f"http://127.0.0.1:{port}"
    answer = requests.post(f"{url}/v1/generate", json={"prompt": "x", "max_new_tokens": 5})
    assert answer.json()["tokens"] == direct_answer(storage, b"x", 5)

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
    assert "no Serve application named 'cli-serve'" in gone.stderr

    # The Serve config file it wrote deploys the same app with Ray's own `serve deploy`.
    serve_cli = str(Path(sys.executable).parent / "serve")
    config = str(storage / "cli-serve" / "serve_config.yaml")
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
    answer = requests.post(f"{url}/v1/generate", json={"prompt": "x", "max_new_tokens": 5})
    assert answer.json()["tokens"] == direct_answer(storage, b"x", 5)
