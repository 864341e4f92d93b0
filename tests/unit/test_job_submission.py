"""What `shipyard submit` sends, decided before anything is sent (no Ray needed)."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import shipyard
from shipyard.errors import ShipyardError
from shipyard.plan.plan import ParallelPlan, make_plan
from shipyard.runtime import requirements
from shipyard.runtime.jobs import jobs_address, pinned_requirements, prepare
from shipyard.runtime.requirements import unmet
from shipyard.spec.job import JobSpec
from tests.conftest import REPO


@pytest.fixture
def job(tmp_path) -> JobSpec:
    return JobSpec(name="tiny", storage=str(tmp_path / "runs"))


def test_the_working_folder_holds_the_spec_the_plan_and_the_cluster(job, tmp_path):
    plan = make_plan(job)
    cluster = REPO / "cluster" / "fake_hetero.yaml"
    submission = prepare(job, plan, "train", tmp_path / "staging", cluster)

    staging = Path(submission.runtime_env["working_dir"])
    assert yaml.safe_load((staging / "job.yaml").read_text()) == job.model_dump(mode="json")
    assert ParallelPlan.from_dict(json.loads((staging / "plan.json").read_text())) == plan
    assert (staging / "cluster.yaml").read_text() == cluster.read_text()
    assert submission.entrypoint == (
        "python -m shipyard.runtime.requirements requirements.txt && "
        "python -m shipyard train job.yaml --cluster cluster.yaml"
    )
    assert (staging / "requirements.txt").read_text().split() == pinned_requirements()
    assert submission.runtime_env["py_modules"] == [str(Path(shipyard.__file__).parent)]
    assert "pip" not in submission.runtime_env, "checked on the cluster, not installed"
    installing = prepare(job, plan, "train", tmp_path / "other", install_deps=True)
    assert installing.runtime_env["pip"] == pinned_requirements()
    assert submission.id.startswith("tiny-")
    assert submission.metadata == {"shipyard_job": "tiny", "shipyard_version": "0.1.0"}


def test_sweeps_and_serving_run_their_own_command(job, tmp_path):
    for command in ("sweep", "serve"):
        submission = prepare(job, make_plan(job), command, tmp_path / command)
        assert submission.entrypoint.endswith(f" && python -m shipyard {command} job.yaml")


def test_the_requirements_are_shipyards_exact_pins_without_dev_tools():
    required = pinned_requirements()
    assert "torch==2.13.0" in required and "deepspeed==0.19.8" in required
    assert any(r.startswith("ray[") and r.endswith("==2.60.0") for r in required)
    assert not any("pytest" in r or "moto" in r for r in required)


def test_s3_settings_but_no_credentials_are_forwarded(job, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    submission = prepare(job, make_plan(job), "train", tmp_path / "staging")
    assert submission.runtime_env["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "SHIPYARD_SUBMISSION_ID": submission.id,
    }


def test_the_jobs_api_address_comes_from_the_flag_the_environment_or_the_cluster(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address, not the Jobs API
    assert jobs_address("head:8265", None) == "http://head:8265"
    assert jobs_address(None, "http://127.0.0.1:8266") == "http://127.0.0.1:8266"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert jobs_address(None, "http://127.0.0.1:8266") == "http://api:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    with pytest.raises(ShipyardError, match="no Jobs API address"):
        jobs_address(None, None)


def test_the_cluster_check_names_each_missing_or_mismatched_package(tmp_path, capsys):
    assert unmet(pinned_requirements()) == [], "this machine has Shipyard's own pins"
    assert unmet(["torch==0.1.0", "no-such-package-xyz", "pyyaml"]) == [
        f"torch {metadata.version('torch')} is installed; the job needs torch==0.1.0",
        "no-such-package-xyz is not installed (the job needs no-such-package-xyz)",
    ]
    wanted = tmp_path / "requirements.txt"
    wanted.write_text("torch==0.1.0\n")
    assert requirements.main(str(wanted)) == 1
    assert "--install-deps" in capsys.readouterr().err
