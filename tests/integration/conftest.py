"""One real Ray for the whole integration session, and small real jobs to train on it."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from shipyard.runtime.local import local_ray_options
from shipyard.spec.job import JobSpec
from shipyard.spec.load import validate

# A model small enough that a 2-worker DeepSpeed run takes seconds on 2 CPU cores.
TINY_JOB = {
    "model": {"layers": 2, "heads": 2, "width": 32, "sequence_length": 32},
    "data": {"max_bytes": 200_000},
    "train": {
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "zero_stage": 1,
        "micro_batch_size": 4,
        "gradient_accumulation": 2,
        "lr": 0.003,
        "warmup_steps": 4,
        "max_steps": 24,
        "log_every": 4,
        "eval_every": 12,
        "checkpoint_every": 12,
        "seed": 11,
    },
    "failure": {"max_failures": 0},
}


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray started once per test session (2 cores: never one per test)."""
    import ray
    from ray.data import DataContext

    ray.init(**local_ray_options(), logging_level=logging.WARNING)
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its DEBUG lines flood reports
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def tiny_job(name: str, storage: Path, **train) -> JobSpec:
    """TINY_JOB with some train fields changed, stored under `storage`."""
    document = {
        **TINY_JOB,
        "name": name,
        "storage": str(storage),
        "train": {**TINY_JOB["train"], **train},
    }
    return validate(JobSpec, document, source=f"<test job {name}>")


@pytest.fixture(scope="session")
def layouts(ray_session, runs_dir):
    """One short training run per layout, shared by every test that compares or serves them."""
    from shipyard.train.trainer import run_training

    cache = {}

    def run(name: str, **train):
        if name not in cache:
            cache[name] = run_training(tiny_job(name, runs_dir, **train))
        return cache[name]

    return run


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll `condition` every half second; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
