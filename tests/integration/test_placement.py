"""Acting on a plan: ranks on the node types it picks, with its uneven batch split.

Ray's fake multinode provider brings up cluster/fake_hetero.yaml on this machine: an "A100"
node and a "T4" node (CPU nodes advertising those models). The planner gives the A100 rank 6
of every 8 samples and the T4 rank 2; the run must land there and train exactly the math of
the even 4 + 4 split, since both draw the same global batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shipyard.runtime.local import free_port
from tests.conftest import REPO
from tests.integration.conftest import TINY_JOB, stop_process_group, wait_for

pytestmark = pytest.mark.integration

FAKE_CLUSTER = REPO / "cluster" / "fake_hetero.yaml"


def environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "token", **extra}


@pytest.fixture
def fake_hetero_cluster(tmp_path):
    """`ray start --head` with the fake multinode autoscaler, until its two workers are up."""
    port, dashboard = free_port(), free_port()
    ray = str(Path(sys.executable).parent / "ray")
    # The fake provider starts its nodes against this GCS (by default 6379, maybe taken).
    config = yaml.safe_load(FAKE_CLUSTER.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config_file = tmp_path / "fake_hetero.yaml"
    config_file.write_text(yaml.safe_dump(config))
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=1",
            f"--autoscaling-config={config_file}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
        ],
        stdout=(tmp_path / "fake-cluster.log").open("w"),
        stderr=subprocess.STDOUT,
        env=environment(RAY_FAKE_CLUSTER="1"),
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: alive_nodes(address) == 3, 180, "the fake cluster's 3 nodes")
        yield address
    finally:
        stop_process_group(head)


def alive_nodes(address: str) -> int:
    """Nodes up in the fake cluster (asked from a process with its token authentication)."""
    count = (
        "from ray.util.state import list_nodes; "
        f"print(sum(n.state == 'ALIVE' for n in list_nodes(address={address!r})))"
    )
    asked = subprocess.run(
        [sys.executable, "-c", count], capture_output=True, text=True, env=environment()
    )
    return int(asked.stdout.strip() or 0) if asked.returncode == 0 else 0


def test_ranks_sit_where_the_plan_says_and_train_the_even_splits_math(
    fake_hetero_cluster, layouts, tmp_path
):
    even = layouts("zero1", zero_stage=1)  # the same job, as written: 4 + 4 samples
    job = {**TINY_JOB, "name": "placed", "storage": str(tmp_path / "runs")}
    job_file = tmp_path / "placed.yaml"
    job_file.write_text(yaml.safe_dump(job))
    planned = subprocess.run(
        [
            sys.executable,
            "-m",
            "shipyard",
            "plan",
            str(job_file),
            "--cluster",
            str(FAKE_CLUSTER),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=environment(),
    )
    plan = json.loads(planned.stdout)
    assert [rank["node_type"] for rank in plan["ranks"]] == ["a100_node", "t4_node"]
    assert plan["replica_micro_batches"] == [6, 2], "the faster node takes more samples"

    trained = subprocess.run(
        [
            sys.executable,
            "-m",
            "shipyard",
            "train",
            str(job_file),
            "--cluster",
            str(FAKE_CLUSTER),
            "--address",
            fake_hetero_cluster,
            "--stop-at-step",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(),
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    rows = [
        json.loads(line)
        for line in (tmp_path / "runs" / "placed" / "metrics.jsonl").read_text().splitlines()
    ]
    # Where Ray really put each rank, as the workers saw it.
    assert rows[0]["node_types"] == ["a100_node", "t4_node"]
    # The same global batches, split 6 + 2 with weighted losses, give the even split's losses
    # (float summation order aside) — a wrong weighting moves them by far more.
    uneven_losses = {row["step"]: row["loss"] for row in rows}
    even_losses = {row["step"]: row["loss"] for row in even.history if row["step"] <= 12}
    assert uneven_losses.keys() == even_losses.keys() == {4, 8, 12}
    for step, loss in even_losses.items():
        assert uneven_losses[step] == pytest.approx(loss, rel=1e-3), step
    assert rows[-1]["val_loss"] == pytest.approx(
        next(row["val_loss"] for row in even.history if row["step"] == 12), rel=1e-3
    )
