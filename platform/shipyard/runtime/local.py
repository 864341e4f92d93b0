"""Connecting to Ray: an embedded local Ray by default, or the cluster in RAY_ADDRESS."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from typing import TextIO

from shipyard.errors import ResourceError

# Ray's switch between a loopback-only node (its macOS/Windows default) and a cluster node.
LOOPBACK_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Set to 1 for the full embedded Ray: dashboard UI, metrics export, an idle worker pool.
FULL_RAY_SWITCH = "SHIPYARD_FULL_RAY"
# A custom resource that marks the embedded Ray, so code running anywhere in it knows the
# cluster is this process's own (and may, say, stop Ray Data's cluster-wide actors).
EMBEDDED_RESOURCE = "shipyard_embedded"
# On 2 cores every idle Ray process costs about 1% of a core, taken from the training ranks.
# A lean embedded Ray runs only what a local job needs: no usage reporting, no metrics export,
# no idle worker pool (a finished task's worker exits), no preemption watcher per run (one
# node that nobody drains). The dashboard stays: Train V2's placement-group cleaner asks its
# state API whether the run's controller is alive.
USAGE_SWITCH = "RAY_USAGE_STATS_ENABLED"
LEAN_ENVIRONMENT = {USAGE_SWITCH: "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
LEAN_SYSTEM_CONFIG = {"enable_metrics_collection": False, "num_workers_soft_limit": 0}
# The raylet warns the driver each time a node's Python processes reach another multiple of 4x
# its CPUs. A Shipyard run always does on a small machine (a run has six Ray processes besides
# its ranks: Ray Train's controller, synchronisation, dataset and clean-up actors, Ray Data's
# autoscaling coordinator, the metrics queue), and a sweep twice over, so the advice it gives
# (fewer actors, whole CPUs) does not apply.
POOL_WARNING = "worker processes have been started on node"
# Ray Data's cluster-wide actors (name, namespace), created on first use and left running.
# (Its AutoscalingCoordinator stays: Ray Train registers each run's resources with it.)
RAY_DATA_ACTORS = (
    ("datasets_stats_actor", "_dataset_stats_actor"),
    ("DataUsageCollectionActor", "DataUsageCollectionActor"),
)


@contextmanager
def ray_runtime(address: str | None = None, *, verbose: bool = False) -> Iterator[None]:
    """Start (or join) Ray for the duration of a command; always shut down what we started.

    If Ray is already initialised in this process (a test session, a notebook), it is reused and
    left running.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    _quiet_ray_data(verbose)
    address = address or os.environ.get("RAY_ADDRESS")
    options = {
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    with nullcontext() if verbose else without_lines(POOL_WARNING):
        if address:
            _join(ray, address, options)
        else:
            start_local_ray(**options)
        try:
            yield
        finally:
            ray.shutdown()


def start_local_ray(**init_options) -> None:
    """Start a new embedded Ray on this machine: every process of it listens on 127.0.0.1 only.

    On Linux Ray takes the machine's outbound address as the node's and its gRPC servers
    listen on every interface; on macOS and Windows it uses the loopback address, and Ray
    makes that choice from one flag (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). It is read once,
    when `ray` is imported, so it is set for the processes Ray starts and, for this one,
    on Ray's constant while the node starts. A node on loopback cannot take other nodes:
    clusters are `shipyard cluster up`'s business, not this function's.

    address="local" always starts a new one: a bare `ray.init()` would join whatever cluster
    `ray start` last recorded in /tmp/ray, even one that has since died. Ray's state API, which
    Train V2's placement-group cleaner calls from inside the cluster, has the same flaw: it reads
    RAY_ADDRESS, else that file. So the GCS port is fixed up front and every Ray process started
    here inherits RAY_ADDRESS naming its own cluster; this process's environment is restored
    (but for a lean Ray's usage switch, which Ray Data reads in the driver).
    Its workers also find Python modules in the folder Shipyard was started from (a model
    factory next to the job), as `python -m` would, and tokenize on one thread each: Ray runs
    a tokenizing task per CPU, and the tokenizers library's own thread pool on top of that
    would fight it for the same cores (a third slower on 2 cores).

    It is lean (LEAN_ENVIRONMENT, LEAN_SYSTEM_CONFIG) unless SHIPYARD_FULL_RAY=1.
    """
    import ray

    full = wants_full_ray()
    address = f"127.0.0.1:{free_port()}"
    python_path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    pinned = {
        "RAY_GCS_SERVER_PORT": address.rsplit(":", 1)[1],
        "RAY_ADDRESS": address,
        "PYTHONPATH": python_path,
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
        LOOPBACK_FLAG: "0",
        **({} if full else LEAN_ENVIRONMENT),
    }
    try:
        with environment(pinned), _node_on_loopback():
            ray.init(
                address="local",
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                resources={EMBEDDED_RESOURCE: 1},
                _system_config=None if full else LEAN_SYSTEM_CONFIG,
                **init_options,
            )
    finally:
        if not full:  # Ray Data asks the driver's environment at every run, and would
            os.environ[USAGE_SWITCH] = "0"  # otherwise start its usage actor each time


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in this process's environment while the block runs; what each name had
    before (or its absence) comes back after."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _node_on_loopback() -> Iterator[None]:
    """Ray's flag for a loopback-only node, set in this (already importing) process."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def wants_full_ray() -> bool:
    """Whether the user asked for the full embedded Ray (SHIPYARD_FULL_RAY=1)."""
    return os.environ.get(FULL_RAY_SWITCH) == "1"


def is_embedded() -> bool:
    """Whether the connected Ray is an embedded one that `start_local_ray` started."""
    import ray

    return ray.cluster_resources().get(EMBEDDED_RESOURCE, 0) > 0


def stop_ray_data_actors() -> None:
    """On the embedded Ray, stop the actors Ray Data leaves behind once a dataset is done:
    they idle through the whole run, on the cores the ranks train on. Ray Data starts them
    again if it is used again. A shared cluster's are left alone: other jobs use them."""
    import ray

    if not is_embedded():
        return
    for name, namespace in RAY_DATA_ACTORS:
        with suppress(ValueError):  # not started
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _join(ray, address: str, options: dict) -> None:
    """Connect to a running cluster, or say clearly why we could not."""
    try:
        ray.init(address=address, **options)
    except ConnectionError as error:
        raise ResourceError(
            f"could not join the Ray cluster at {address}: {error}. To fix: check the address "
            "(host:port of the head's GCS); for a cluster with token authentication (Ray's "
            "default for `ray start`), set RAY_AUTH_MODE=token and provide its token in "
            "~/.ray/auth_token or RAY_AUTH_TOKEN."
        ) from None


@contextmanager
def without_lines(marker: str) -> Iterator[None]:
    """sys.stdout, minus the lines that contain `marker`, until the block ends (Ray's driver
    prints the raylet's warnings there from a thread of its own)."""
    filtered = LineFilter(sys.stdout, marker)
    sys.stdout = filtered
    try:
        yield
    finally:
        if sys.stdout is filtered:
            sys.stdout = filtered.stream


class LineFilter:
    """A text stream that passes everything on to `stream` but what `print` writes for a
    line containing `marker` (the text, and the newline `print` writes after it)."""

    def __init__(self, stream: TextIO, marker: str):
        self.stream, self.marker = stream, marker
        self._dropped_by: int | None = None  # the thread whose line was just dropped

    def write(self, text: str) -> int:
        thread = threading.get_ident()
        if self.marker in text:
            self._dropped_by = thread
            return len(text)
        if text == "\n" and self._dropped_by == thread:
            self._dropped_by = None
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data prints a banner per dataset; Shipyard shows its own progress instead."""
    from ray.data import DataContext

    if not verbose:
        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
