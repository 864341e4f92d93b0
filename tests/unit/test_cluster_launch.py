"""What `shipyard cluster up|down` would run for each kind of cluster YAML (nothing started)."""

from __future__ import annotations

from pathlib import Path

import yaml

from shipyard.cli import main
from shipyard.runtime.cluster import (
    expected_nodes,
    launch_plan,
    node_type_of,
    recorded_address,
    stop_local,
)
from shipyard.spec.load import load_cluster
from tests.conftest import REPO

CLUSTERS = REPO / "cluster"


def test_a_cloud_yaml_goes_to_rays_cluster_launcher():
    path = CLUSTERS / "aws_hetero.yaml"
    launch = launch_plan(load_cluster(path), path, 6379)
    assert launch.up[1:] == ["up", "-y", str(path)]
    assert launch.down[1:] == ["down", "-y", str(path)]
    assert not launch.on_this_machine


def test_local_yaml_starts_a_head_on_loopback_only():
    path = CLUSTERS / "local.yaml"
    launch = launch_plan(load_cluster(path), path, 7001)
    assert launch.address == "127.0.0.1:7001"
    assert launch.up[1:5] == ["start", "--head", "--block", "--port=7001"]
    assert "--node-ip-address=127.0.0.1" in launch.up and "--dashboard-host=127.0.0.1" in launch.up
    assert launch.environment == {}
    # A free port, not Ray's fixed default 52365, which another Ray on this machine may hold.
    (agent,) = [a for a in launch.up if a.startswith("--dashboard-agent-listen-port=")]
    assert int(agent.split("=")[1]) > 0


def test_fake_multinode_points_its_nodes_at_our_head(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path))
    path = CLUSTERS / "fake_hetero.yaml"
    cluster = load_cluster(path)
    launch = launch_plan(cluster, path, 7002)
    assert launch.environment == {"RAY_FAKE_CLUSTER": "1"}
    assert "--num-cpus=1" in launch.up
    (config,) = [arg.split("=", 1)[1] for arg in launch.up if arg.startswith("--autoscaling")]
    assert not Path(config).exists(), "planning writes nothing; `up` writes the config"
    written = yaml.safe_load(launch.files[Path(config)])
    assert written["provider"]["gcs_address"] == "127.0.0.1:7002"
    assert (
        written["available_node_types"] == yaml.safe_load(path.read_text())["available_node_types"]
    )
    assert expected_nodes(cluster) == 3  # the head and one node of each type
    a100 = {"head": False, "labels": {"shipyard-device": "a100"}}
    head = {"head": True, "labels": {"ray.io/node-id": "x"}}
    assert node_type_of(cluster, a100) == "a100_node"
    assert node_type_of(cluster, head) == "ray.head.default"
    assert node_type_of(cluster, {"head": False, "labels": {}}) == "(not in this YAML)"


def test_dry_run_prints_the_commands_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path))
    assert main(["cluster", "up", str(CLUSTERS / "aws_hetero.yaml"), "--dry-run"]) == 0
    assert f"up -y {CLUSTERS / 'aws_hetero.yaml'}" in capsys.readouterr().out
    assert main(["cluster", "up", str(CLUSTERS / "fake_hetero.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would run: RAY_FAKE_CLUSTER=1 ") and "then wait for 3 nodes" in out
    assert main(["cluster", "down", str(CLUSTERS / "local.yaml"), "--dry-run"]) == 0
    assert "process group" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*")), "nothing was started, recorded or written"


def test_status_of_a_cluster_that_is_not_up_says_how_to_start_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["cluster", "status", str(CLUSTERS / "local.yaml")]) == 2
    assert "To fix: shipyard cluster up" in capsys.readouterr().err


def test_the_local_provider_with_worker_ips_is_an_on_premise_cluster_for_ray_up(tmp_path):
    document = yaml.safe_load((CLUSTERS / "local.yaml").read_text())
    document["provider"].update(head_ip="10.0.0.1", worker_ips=["10.0.0.2"])
    path = tmp_path / "onprem.yaml"
    path.write_text(yaml.safe_dump(document))
    launch = launch_plan(load_cluster(path), path)
    assert launch.up[1:] == ["up", "-y", str(path)] and not launch.on_this_machine


def test_a_record_whose_pid_now_belongs_to_another_process_is_not_our_cluster(
    tmp_path, monkeypatch
):
    """After a reboot the recorded PID may be some other process: `down` must not signal it."""
    import json
    import os

    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path))
    cluster = load_cluster(CLUSTERS / "local.yaml")
    record = tmp_path / "clusters" / "local.json"
    record.parent.mkdir()
    stale = {"pid": os.getpid(), "started": 1.0, "address": "127.0.0.1:1", "log": "x"}
    record.write_text(json.dumps(stale))
    assert recorded_address(cluster) is None
    assert stop_local(cluster) is False  # nothing was up: the stale record is only cleared
    assert not record.exists()
