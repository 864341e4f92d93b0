"""Shipyard commands as jobs on a running cluster, through Ray's Jobs API.

A submission is checked and planned here first, so a bad spec never reaches the cluster. The
job then ships as a runtime environment: a folder with the spec (and the cluster YAML) and
Shipyard's pinned requirements, and the Shipyard package itself. The entrypoint first checks the
cluster's Python has those pins (or, with `install_deps`, Ray's pip plugin installs them into a
virtualenv per cluster), then runs the same `shipyard` command a user would type on the head.
The spec, the plan and the versions are recorded beside the job's checkpoints, so any run can be
reproduced.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

import shipyard
from shipyard.errors import ResourceError, ShipyardError
from shipyard.plan.plan import ParallelPlan
from shipyard.spec.job import JobSpec
from shipyard.storage import open_store

COMMANDS = ("train", "sweep", "serve")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RECORDS = "submissions"  # <storage>/<job>/submissions/<id>/{job.yaml, plan.json, submission.json}
REQUIREMENTS = "requirements.txt"  # in the job's working folder
# Settings that tell the cluster where S3 is; credentials stay out of the job's (visible) info.
FORWARDED_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")


class JobsError(ShipyardError):
    """The Jobs API cannot be reached, or has no such job."""


@dataclass(frozen=True)
class Submission:
    """Everything sent for one job, decided before anything is sent."""

    id: str
    command: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def prepare(
    job: JobSpec,
    plan: ParallelPlan,
    command: str,
    staging: Path,
    cluster_file: Path | None = None,
    install_deps: bool = False,
) -> Submission:
    """Write the job's working folder into `staging` and describe the submission."""
    submission_id = f"{job.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{os.urandom(2).hex()}"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "job.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    (staging / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    (staging / REQUIREMENTS).write_text("\n".join(pinned_requirements()) + "\n")
    command_line = f"python -m shipyard {command} job.yaml"
    if cluster_file is not None and command == "train":
        shutil.copyfile(cluster_file, staging / "cluster.yaml")
        command_line += " --cluster cluster.yaml"
    runtime_env = {
        "working_dir": str(staging),
        "py_modules": [str(Path(shipyard.__file__).parent)],
        "env_vars": {
            **{k: os.environ[k] for k in FORWARDED_ENVIRONMENT if k in os.environ},
            "SHIPYARD_SUBMISSION_ID": submission_id,  # the run's tracking tags it
        },
    }
    if install_deps:  # a virtualenv per cluster; slow to build beside a large torch install
        runtime_env["pip"] = pinned_requirements()
    entrypoint = f"python -m shipyard.runtime.requirements {REQUIREMENTS} && {command_line}"
    facts = {"shipyard_job": job.name, "shipyard_version": shipyard.__version__}
    return Submission(submission_id, command, entrypoint, runtime_env, facts)


def pinned_requirements() -> list[str]:
    """Shipyard's own requirements as installed here (the exact pins of pyproject.toml)."""
    required = metadata.requires("shipyard") or []
    return [requirement for requirement in required if "extra ==" not in requirement]


def record(job: JobSpec, submission: Submission, staging: Path, address: str) -> str:
    """Keep the spec, the plan and the facts of the submission beside the job's checkpoints."""
    store = open_store(job.storage)
    folder = f"{job.name}/{RECORDS}/{submission.id}"
    facts = {
        "id": submission.id,
        "command": submission.command,
        "entrypoint": submission.entrypoint,
        "jobs_api": address,
        "submitted_at": datetime.now(UTC).isoformat(),
        "shipyard_version": shipyard.__version__,
        "python": sys.version.split()[0],
        "requirements": pinned_requirements(),
        "installed_by_ray": "pip" in submission.runtime_env,
    }
    store.upload(staging / "job.yaml", f"{folder}/job.yaml")
    store.upload(staging / "plan.json", f"{folder}/plan.json")
    store.put_text(f"{folder}/submission.json", json.dumps(facts, indent=2))
    return f"{store.uri}/{folder}"


def submit(client, submission: Submission, timeout_s: float = 60) -> str:
    """Send the job; its id. A head that has just started may have no job agent registered
    yet ("No available agent ..., please try again later"): try again, for `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _call(
                lambda: client.submit_job(
                    entrypoint=submission.entrypoint,
                    submission_id=submission.id,
                    runtime_env=submission.runtime_env,
                    metadata=submission.metadata,
                )
            )
        except JobsError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def client_for(address: str):
    """A Jobs API client for the dashboard at `address`, or a clear error."""
    from ray.job_submission import JobSubmissionClient

    return _call(lambda: JobSubmissionClient(address), address)


def jobs_address(given: str | None, recorded: str | None) -> str:
    """The Jobs API's URL: --address, RAY_API_SERVER_ADDRESS, an http:// RAY_ADDRESS, or the
    dashboard of the cluster `shipyard cluster up` started."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    for candidate in (
        given,
        os.environ.get("RAY_API_SERVER_ADDRESS"),
        ray_address if ray_address.startswith("http") else None,
        recorded,
    ):
        if candidate:
            return candidate if "://" in candidate else f"http://{candidate}"
    raise JobsError(
        "no Jobs API address. To fix: give --address http://HEAD:8265 (for a cloud cluster, "
        "`ray dashboard CLUSTER_YAML` forwards it to 127.0.0.1:8265), set "
        "RAY_API_SERVER_ADDRESS, or --cluster a cluster started with `shipyard cluster up`."
    )


def status(client, submission_id: str) -> Any:
    """The job's details (status, message, times, entrypoint, metadata)."""
    return _call(lambda: client.get_job_info(submission_id))


def list_jobs(client) -> list[Any]:
    """Every job the cluster knows, newest first."""
    jobs = _call(client.list_jobs)
    return sorted(jobs, key=lambda job: job.start_time or 0, reverse=True)


def logs(client, submission_id: str) -> str:
    return _call(lambda: client.get_job_logs(submission_id))


def follow(client, submission_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's logs as they come until it ends; its final status."""
    status(client, submission_id)  # a clear error for an unknown id

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            write(lines)

    asyncio.run(tail())
    return status_name(status(client, submission_id).status)


def stop(client, submission_id: str, timeout_s: float = 60) -> str:
    """Ask the job to stop and wait until it has; its final status."""
    _call(lambda: client.stop_job(submission_id))
    deadline = time.monotonic() + timeout_s
    while (state := status_name(status(client, submission_id).status)) not in TERMINAL:
        if time.monotonic() > deadline:
            raise JobsError(f"job {submission_id} is still {state} after {timeout_s:.0f} s.")
        time.sleep(0.5)
    return state


def status_name(value: Any) -> str:
    """A Jobs API enum (or plain value) as its plain text, e.g. SUCCEEDED."""
    return str(getattr(value, "value", value))


def _call(request: Callable[[], Any], address: str | None = None) -> Any:
    """Run one Jobs API request; Ray's connection and HTTP errors become a JobsError."""
    try:
        return request()
    except ShipyardError:
        raise
    except ConnectionError as error:
        raise ResourceError(
            f"cannot reach the Jobs API{f' at {address}' if address else ''}: {error}. To fix: "
            "check the cluster is up and the dashboard address (port 8265 by default); for "
            "token authentication (Ray's default) set RAY_AUTH_MODE=token."
        ) from None
    except RuntimeError as error:  # the client's wrapper for HTTP errors (404, 401, ...)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise JobsError(first) from None
