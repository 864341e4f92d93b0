"""`shipyard cluster up|down|status`: bring up the cluster a YAML describes, and look at it.

- A cloud provider (aws, gcp, azure, kubernetes …): Ray's cluster launcher, `ray up` and
  `ray down` with the same YAML (`--dry-run` prints the command).
- `cluster/local.yaml` (provider `local`, this machine only): a Ray head on 127.0.0.1.
- Ray's fake multinode provider (`cluster/fake_hetero.yaml`): a head with the autoscaler and
  RAY_FAKE_CLUSTER=1, which starts each node type's nodes as local processes, labels and all.
For the last two the head runs in a process group of its own, recorded in a state file, so
`down` stops exactly that cluster and never another Ray on the machine. Token authentication
stays on (Ray's default for `ray start`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from shipyard.errors import ResourceError
from shipyard.runtime.local import free_port
from shipyard.spec.cluster import ClusterSpec, labels_match
from shipyard.spec.load import read_yaml
from shipyard.storage import cache_root

LOOPBACK = (None, "127.0.0.1", "localhost")


@dataclass(frozen=True)
class Launch:
    """How to bring one cluster YAML up and down."""

    up: list[str]
    down: list[str]
    environment: dict[str, str]
    address: str | None  # the head's GCS address, when Shipyard starts the head here
    dashboard: str | None = None  # and its dashboard (Jobs API) URL
    files: dict[Path, str] = field(default_factory=dict)  # written by `up` before it starts

    @property
    def on_this_machine(self) -> bool:
        return self.address is not None


def state_folder() -> Path:
    """Where running local clusters are recorded (SHIPYARD_CACHE, else ~/.cache/shipyard)."""
    return cache_root() / "clusters"


def launch_plan(
    cluster: ClusterSpec, path: Path, port: int = 6379, dashboard_port: int = 8265
) -> Launch:
    """The commands for `cluster` (read from `path`); a local head listens on `port`, its
    dashboard (and Jobs API) on `dashboard_port`."""
    ray = str(Path(sys.executable).parent / "ray")
    document = read_yaml(path, "cluster YAML")
    if not _runs_here(document["provider"]):
        return Launch([ray, "up", "-y", str(path)], [ray, "down", "-y", str(path)], {}, None)
    address = f"127.0.0.1:{port}"
    head = [ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1"]
    head += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    # The dashboard agent (which runs Jobs API submissions) listens on 52365 by default; with
    # another Ray on this machine holding it, the agent fails and no job can be submitted.
    head.append(f"--dashboard-agent-listen-port={free_port()}")
    environment, files = {}, {}
    if cluster.provider == "fake_multinode":
        # Fake nodes join the GCS named in the provider (by default 6379, maybe taken).
        document["provider"]["gcs_address"] = address
        config = state_folder() / f"{cluster.name}.autoscaler.yaml"
        files[config] = yaml.safe_dump(document)
        head_cpus = next(n.cpus for n in cluster.node_types if n.is_head)
        head += [f"--num-cpus={head_cpus:g}", f"--autoscaling-config={config}"]
        environment["RAY_FAKE_CLUSTER"] = "1"
    return Launch(head, [], environment, address, f"http://127.0.0.1:{dashboard_port}", files)


def _runs_here(provider: dict[str, Any]) -> bool:
    """Fake multinode, or the local provider with this machine alone (with worker IPs, the
    local provider is an on-premise cluster that `ray up` sets up over SSH)."""
    if provider["type"] == "fake_multinode":
        return True
    alone = not provider.get("worker_ips")
    return provider["type"] == "local" and alone and provider.get("head_ip") in LOOPBACK


def expected_nodes(cluster: ClusterSpec) -> int:
    """Nodes up once the cluster has started: the head and every node type's minimum."""
    return 1 + sum(node.min_nodes for node in cluster.node_types if not node.is_head)


def start_local(cluster: ClusterSpec, launch: Launch, timeout_s: float = 300) -> dict[str, Any]:
    """Start the head in its own process group, record it, and wait for the cluster's nodes."""
    record = state_folder() / f"{cluster.name}.json"
    if record.exists() and _running(json.loads(record.read_text())):
        raise ResourceError(
            f"cluster {cluster.name!r} is already up ({record}). To fix: shipyard cluster down "
            f"{cluster.source} first."
        )
    log = state_folder() / f"{cluster.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for path, text in launch.files.items():  # e.g. the fake cluster's autoscaler config
        path.write_text(text)
    head = subprocess.Popen(
        launch.up,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **launch.environment, **_jobs_use_this_python(cluster)},
        start_new_session=True,  # its own process group: `down` stops this cluster only
    )
    state = {
        "pid": head.pid,
        "started": psutil.Process(head.pid).create_time(),
        "address": launch.address,
        "dashboard": launch.dashboard,
        "log": str(log),
    }
    _write_atomically(record, json.dumps(state))
    wanted, deadline = expected_nodes(cluster), time.monotonic() + timeout_s
    while (up := len(cluster_state(launch.address)["nodes"])) < wanted:
        if head.poll() is not None or time.monotonic() > deadline:
            stop_local(cluster)
            raise ResourceError(
                f"cluster {cluster.name!r}: {up} of {wanted} nodes came up. See {log}."
            )
        time.sleep(1)
    return state


def stop_local(cluster: ClusterSpec) -> bool:
    """Stop the recorded head's process group (SIGTERM, then SIGKILL); False if none was up.
    A stale record (its head gone) is cleared."""
    record = state_folder() / f"{cluster.name}.json"
    if not record.exists():
        return False
    state = json.loads(record.read_text())
    pid, running = state["pid"], _running(state)
    if running:
        os.killpg(pid, signal.SIGTERM)
        # A graceful Ray stop waits up to 30 s per actor; a few seconds is enough here.
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    record.unlink()
    return running


def recorded_address(cluster: ClusterSpec, kind: str = "address") -> str | None:
    """The GCS `address` (or `dashboard` URL) of the cluster `up` started here, if it runs."""
    record = state_folder() / f"{cluster.name}.json"
    if not record.exists():
        return None
    state = json.loads(record.read_text())
    return state.get(kind) if _running(state) else None


STATE_QUERY = """
import json, sys
from ray.util.state import list_jobs, list_nodes
address = sys.argv[1]
nodes = [
    {"id": n.node_id, "head": n.is_head_node, "labels": n.labels, "resources": n.resources_total}
    for n in list_nodes(address=address, detail=True)
    if n.state == "ALIVE"
]
jobs = [
    {"id": j.submission_id or j.job_id, "status": str(j.status), "entrypoint": j.entrypoint}
    for j in list_jobs(address=address)
]
print(json.dumps({"nodes": nodes, "jobs": jobs}))
"""


def cluster_state(address: str) -> dict[str, list[dict[str, Any]]]:
    """The cluster's live nodes (id, head?, labels, resources) and its Ray jobs, asked in a
    process of its own: the state API needs the cluster's token authentication, whatever
    this process may have joined. Empty if the cluster does not answer."""
    answer = subprocess.run(
        [sys.executable, "-c", STATE_QUERY, address],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
        timeout=60,
    )
    if answer.returncode != 0 or not answer.stdout.strip():
        return {"nodes": [], "jobs": []}
    return json.loads(answer.stdout.strip().splitlines()[-1])


def node_type_of(cluster: ClusterSpec, node: dict[str, Any]) -> str:
    """The node type a live node is: by its labels, the head by Ray's own flag."""
    for node_type in cluster.node_types:
        if node_type.is_head == node["head"] and labels_match(
            node_type.node_selector, node["labels"]
        ):
            return node_type.name
    if node["head"]:
        return next(node_type.name for node_type in cluster.node_types if node_type.is_head)
    return "(not in this YAML)"


def _jobs_use_this_python(cluster: ClusterSpec) -> dict[str, str]:
    """The head's environment: token authentication, and a `python` first on PATH that runs
    this Python (the virtualenv Ray and Shipyard are installed in), as a cluster image's would
    for a job's entrypoint. Only `python`: the rest of PATH (e.g. the system's ninja, which
    DeepSpeed's cached JIT ops were built with) stays as it is."""
    folder = state_folder() / f"{cluster.name}.bin"
    folder.mkdir(parents=True, exist_ok=True)
    python = folder / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    path = os.pathsep.join([str(folder), os.environ["PATH"]])
    return {"RAY_AUTH_MODE": "token", "PATH": path}


def _running(state: dict[str, Any]) -> bool:
    """The recorded head still runs: its PID is alive and was started when the record says
    (after a reboot the PID may belong to some other process)."""
    try:
        return psutil.Process(state["pid"]).create_time() == state.get("started")
    except psutil.NoSuchProcess:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(temporary, path)
