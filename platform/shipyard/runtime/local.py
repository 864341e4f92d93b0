"""Connecting to Ray: an embedded local Ray by default, or the cluster in RAY_ADDRESS."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager


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
        ray.init(address=address, **options)
    else:
        # The dashboard stays on: Train V2 needs it to clean up its placement groups.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", **options)
    try:
        yield
    finally:
        ray.shutdown()


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data prints a banner per dataset; Shipyard shows its own progress instead."""
    from ray.data import DataContext

    if not verbose:
        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
