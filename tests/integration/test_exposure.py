"""What a local run exposes to the network: nothing beyond this machine."""

from __future__ import annotations

import ipaddress

import psutil
import pytest

pytestmark = pytest.mark.integration


def listening_addresses(pids: set[int]) -> dict[str, str]:
    """Every TCP socket the processes `pids` listen on: "address:port" -> process name."""
    found = {}
    for socket in psutil.net_connections(kind="tcp"):
        if socket.status == psutil.CONN_LISTEN and socket.pid in pids:
            found[f"{socket.laddr.ip}:{socket.laddr.port}"] = psutil.Process(socket.pid).name()
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return (mapped or ip).is_loopback


def test_the_embedded_ray_listens_on_loopback_only(ray_session):
    """GCS, raylet, dashboard and its agents, the runtime-env agent, the driver and workers."""
    ray = ray_session

    @ray.remote(num_cpus=0.1)
    class Worker:
        def pid(self) -> int:
            import os

            return os.getpid()

    worker = Worker.remote()
    worker_pid = ray.get(worker.pid.remote())
    ours = psutil.Process()
    pids = {ours.pid} | {child.pid for child in ours.children(recursive=True)}
    assert worker_pid in pids
    listening = listening_addresses(pids)
    names = set(listening.values())
    assert {"gcs_server", "raylet"} <= names, listening
    exposed = {address: name for address, name in listening.items() if not is_loopback(address)}
    assert exposed == {}, f"listening beyond 127.0.0.1: {exposed}"
    ray.kill(worker)
