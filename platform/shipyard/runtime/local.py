"""Connecting to Ray: an embedded local Ray by default, or the cluster in RAY_ADDRESS."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from shipyard.errors import ResourceError


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
    if address:
        _join(ray, address, options)
    else:
        ray.init(**local_ray_options(), **options)
    try:
        yield
    finally:
        ray.shutdown()


def local_ray_options() -> dict:
    """`ray.init` options for a new embedded Ray on this machine.

    address="local" always starts a new one: a bare `ray.init()` would join whatever cluster
    `ray start` last recorded in /tmp/ray, even one that has since died. The dashboard stays on
    (Train V2 needs it to clean up placement groups) and listens on 127.0.0.1 only.
    """
    return {"address": "local", "include_dashboard": True, "dashboard_host": "127.0.0.1"}


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


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data prints a banner per dataset; Shipyard shows its own progress instead."""
    from ray.data import DataContext

    if not verbose:
        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
