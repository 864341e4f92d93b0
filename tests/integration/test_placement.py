"""Acting on a plan: ranks on the node types it picks, with its uneven batch split.

`shipyard cluster up` brings cluster/fake_hetero.yaml up on this machine through Ray's fake
multinode provider: an "A100"
node and a "T4" node (CPU nodes advertising those models). The planner gives the A100 rank 6
of every 8 samples and the T4 rank 2; the run must land there and train exactly the math of
the even 4 + 4 split, since both draw the same global batches.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from tests.integration.conftest import SHIPYARD, TINY_JOB, cluster_up, without_ray_address

pytestmark = pytest.mark.integration

FAKE_CLUSTER = REPO / "cluster" / "fake_hetero.yaml"


@pytest.fixture
def fake_hetero_cluster(tmp_path):
    """cluster/fake_hetero.yaml up (Ray's fake multinode provider); yields its GCS address."""
    with cluster_up(FAKE_CLUSTER, tmp_path) as (address, _):
        yield address


def test_ranks_sit_where_the_plan_says_and_train_the_even_splits_math(
    fake_hetero_cluster, layouts, tmp_path
):
    status = subprocess.run(
        [*SHIPYARD, "cluster", "status", str(FAKE_CLUSTER), "--address", fake_hetero_cluster],
        capture_output=True,
        text=True,
        env=without_ray_address(),
    )
    assert status.returncode == 0, status.stderr
    for node_type, accelerator in (("a100_node", "A100-80G"), ("t4_node", "T4")):
        row = next(line for line in status.stdout.splitlines() if node_type in line)
        assert accelerator in row, status.stdout

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
        env=without_ray_address(),
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
        env=without_ray_address(),
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
