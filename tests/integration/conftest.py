"""One real Ray for the whole integration session, and small real jobs to train on it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shipyard.runtime.local import free_port, start_local_ray
from shipyard.spec.job import JobSpec
from shipyard.spec.load import validate
from tests.conftest import REPO

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
    # Off for speed (an MLflow store costs seconds a run); tests of tracking turn it on.
    "tracking": {"mlflow": False, "tensorboard": False},
}


# A tiny transformers Llama, for tests that need any Hugging Face model quickly.
TINY_LLAMA = {
    "type": "huggingface",
    "architecture": "llama",
    "sequence_length": 32,
    "config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 64,
    },
}


# 3D parallelism on 2 cores: 4 workers, one replica of 2 stages × 2 tensor-parallel shards.
PP2_TP2 = {
    "zero_stage": 1,
    "pipeline_stages": 2,
    "tensor_parallel": 2,
    "num_workers": 4,
    "cpus_per_worker": 0.45,
}


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray started once per test session (2 cores: never one per test)."""
    import ray
    from ray.data import DataContext

    start_local_ray(logging_level=logging.WARNING)
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its DEBUG lines flood reports
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def tiny_job(name: str, storage: Path | str, **train) -> JobSpec:
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


def shipped_job(
    file: str, name: str, storage: Path | str, tokenizer: dict | None = None, **train
) -> JobSpec:
    """The model of the shipped job `jobs/<file>`, trained as the tests train TINY_JOB (24
    steps on 200 KB, bytes unless a `tokenizer` is given) with `train` changed: the shipped
    model itself, in a test's time."""
    from shipyard.spec.load import read_yaml

    shipped = read_yaml(REPO / "jobs" / file)
    document = {
        **TINY_JOB,
        "name": name,
        "storage": str(storage),
        "model": shipped["model"],
        "train": {**TINY_JOB["train"], **train},
    }
    if tokenizer:
        document["tokenizer"] = tokenizer
    return validate(JobSpec, document, source=f"<test job {name} from jobs/{file}>")


@pytest.fixture(scope="session")
def model_runs(ray_session, runs_dir):
    """One short training run per shipped model and layout, shared by every test that
    compares, exports or serves them: model_runs("tiny-llama.yaml", "zero0", zero_stage=0)."""
    from shipyard.train.trainer import run_training

    cache = {}

    def run(file: str, name: str, **train):
        if name not in cache:
            cache[name] = run_training(shipped_job(file, name, runs_dir, **train))
        return cache[name]

    return run


@pytest.fixture(scope="session")
def mixer_run(ray_session, runs_dir):
    """tests/factories.py:mixer (a factory's nn.Sequential) trained in 2 pipeline stages; the
    result, and a function making the same job under another name."""
    from shipyard.train.trainer import run_training

    model = {"type": "python", "factory": "tests.factories:mixer", "sequence_length": 32}

    def job_for(name: str) -> JobSpec:
        job = tiny_job(name, runs_dir, pipeline_stages=2, micro_batch_size=8)
        return JobSpec.model_validate({**job.model_dump(), "model": model})

    return run_training(job_for("mixer")), job_for


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll `condition` every half second; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def validation_loss(model, job: JobSpec, plan=None) -> float:
    """`job`'s validation loss as its workers compute it: the first global micro-batches of the
    validation windows, each replica's slice, weighted by its number of windows. `model` maps
    token ids to logits (or, as transformers' models do, to an output with .logits)."""
    import torch

    from shipyard.data.batches import TokenStream, evaluation_batches, replica_slices
    from shipyard.data.corpus import local_corpus, prepare_corpus
    from shipyard.models.family import logits_of
    from shipyard.models.loss import language_model_loss
    from shipyard.plan.plan import make_plan

    plan = plan or make_plan(job)
    micro = plan.micro_batches
    corpus = prepare_corpus(job)
    stream = TokenStream(
        local_corpus(corpus) / "validation.bin", corpus.dtype, job.model.sequence_length
    )
    total = 0.0
    batches = evaluation_batches(stream, sum(micro), job.train.eval_batches)
    with torch.no_grad():
        for batch in batches:
            for part in replica_slices(micro):
                tokens = batch[part]
                logits = logits_of(model(tokens[:, :-1]))
                loss = language_model_loss(logits, tokens[:, 1:]).item()
                total += loss * len(tokens)
    return total / (sum(micro) * len(batches))


SHIPYARD = [sys.executable, "-m", "shipyard"]


def without_ray_address(**extra: str) -> dict[str, str]:
    """This environment minus RAY_ADDRESS, with Ray's token authentication asked for."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "token", **extra}


@contextmanager
def cluster_up(cluster_yaml: Path, folder: Path) -> Iterator[tuple[str, str]]:
    """`shipyard cluster up` on free ports until its nodes are up, `shipyard cluster down`
    after; yields the GCS address and the dashboard (Jobs API) URL."""
    env = without_ray_address(SHIPYARD_CACHE=str(folder / "shipyard-cache"))
    port, dashboard = free_port(), free_port()
    ports = ["--port", str(port), "--dashboard-port", str(dashboard)]
    up = subprocess.run(
        [*SHIPYARD, "cluster", "up", str(cluster_yaml), *ports],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
    finally:
        down = subprocess.run(
            [*SHIPYARD, "cluster", "down", str(cluster_yaml)], capture_output=True, env=env
        )
        assert down.returncode == 0 and b"stopped" in down.stdout, down.stdout + down.stderr
