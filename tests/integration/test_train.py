"""Real Ray Train + DeepSpeed runs on 2 CPU workers: every ZeRO stage, pipelines, resume, faults."""

from __future__ import annotations

import json
import math

import pytest

from shipyard.serve.deployment import prepare_service
from shipyard.serve.export import export_checkpoint, load_exported_model
from shipyard.spec.tracking import TrackingSpec
from shipyard.storage import open_store
from shipyard.train.checkpoint import latest_checkpoint, local_copy, saved_checkpoints
from shipyard.train.trainer import START_PARTS, run_training
from shipyard.train.worker import Fault
from tests.integration.conftest import PP2_TP2, shipped_job, tiny_job, validation_loss

pytestmark = pytest.mark.integration

UNIFORM_LOSS = math.log(256)  # an untrained byte-level model


def losses(result) -> list[float]:
    return [row["loss"] for row in result.history if "loss" in row]


@pytest.mark.parametrize(
    ("name", "train"),
    [
        ("zero0", {"zero_stage": 0}),
        ("zero1", {"zero_stage": 1}),
        ("zero2", {"zero_stage": 2, "checkpoint_every": 6}),
        ("zero3", {"zero_stage": 3}),
        ("pipeline2", {"zero_stage": 1, "pipeline_stages": 2}),
    ],
)
def test_loss_falls_clearly(layouts, name, train):
    result = layouts(name, **train)
    history = losses(result)
    assert result.final["step"] == 24
    assert [row["step"] for row in result.history if row["step"] % 4 == 0] == [4, 8, 12, 16, 20, 24]
    assert history[-1] < history[0] - 0.8, history
    assert result.final["val_loss"] < UNIFORM_LOSS - 1.0
    assert result.final["tokens_per_s"] > 0
    assert result.checkpoint_path is not None


def test_zero3_matches_zero0_for_the_same_seed(layouts):
    """ZeRO only changes where state lives, not the math.

    fp32 on CPU: ZeRO-3 reduce-scatters and re-gathers instead of all-reducing, which changes
    floating-point summation order (~1e-7 relative per step). Through 24 Adam steps that stays
    far below 1e-3, while a real difference (another batch, a missed step) moves the loss by > 1e-2.
    """
    zero0, zero3 = losses(layouts("zero0", zero_stage=0)), losses(layouts("zero3", zero_stage=3))
    assert zero3 == pytest.approx(zero0, rel=1e-3)


def test_pipeline_trains_the_same_model_as_data_parallel(layouts):
    """Pipeline stages rebuild the same per-layer initialisation; losses start identical.

    Later losses differ by design: pipeline 2 on 2 workers is 1 replica, so each step sees
    half as many sequences as the 2-replica data-parallel run.
    """
    pipeline = layouts("pipeline2", zero_stage=1, pipeline_stages=2).history
    assert pipeline[-1]["val_loss"] < UNIFORM_LOSS - 1.0


def test_tensor_parallel_trains_the_same_model_as_one_device(layouts):
    """Pipeline 2 × tensor parallel 2 over 4 workers is one replica, as pipeline 2 over 2
    workers is: the same batches and the same model (each layer's weights cut in two), so the
    same losses at every step, up to summation order."""
    pipeline = layouts("pipeline2", zero_stage=1, pipeline_stages=2)
    split = layouts("pp2tp2", **PP2_TP2)
    assert split.final["step"] == 24
    assert losses(split) == pytest.approx(losses(pipeline), rel=1e-3)
    assert split.final["val_loss"] == pytest.approx(pipeline.final["val_loss"], rel=1e-3)


def test_run_stopped_halfway_resumes_from_s3_to_the_same_loss(layouts, s3, tmp_path, monkeypatch):
    """Checkpoints and the metrics log on S3 (moto): the second run starts on a machine with
    nothing of the first (an empty local cache) and continues exactly where it stopped."""
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path / "first-machine"))
    uninterrupted = layouts("zero1", zero_stage=1)
    job = tiny_job("resumed", f"{s3}/runs", zero_stage=1)

    first = run_training(job, stop_at_step=12)
    assert first.final["step"] == 12
    saved = saved_checkpoints(job.storage, job.name)
    assert [c.step for c in saved] == [12]
    assert saved[0].path.startswith(f"{s3}/runs/resumed/checkpoint_")

    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path / "second-machine"))
    second = run_training(job)
    assert second.history[0]["resumed_from_step"] == 12
    assert second.final["step"] == 24
    # Same data order, LR schedule and optimizer state: the loss curve continues exactly.
    assert losses(first) + losses(second) == pytest.approx(losses(uninterrupted), rel=1e-5)
    assert second.final["val_loss"] == pytest.approx(uninterrupted.final["val_loss"], rel=1e-5)
    assert second.final["lr"] == pytest.approx(uninterrupted.final["lr"])
    assert second.checkpoint_path.startswith(f"{s3}/runs/resumed/")

    logged = open_store(job.storage).get_text("resumed/metrics.jsonl").splitlines()
    assert [json.loads(row) for row in logged] == first.history + second.history
    latest = local_copy(latest_checkpoint(job.storage, job.name), tmp_path / "download")
    model = load_exported_model(export_checkpoint(latest))
    assert validation_loss(model, job) == pytest.approx(second.final["val_loss"], rel=1e-4)
    # `shipyard serve --checkpoint s3://…/checkpoint_…` serves that training checkpoint.
    served = prepare_service(job, second.checkpoint_path).export
    assert served.step == 24 and served.sha256 == export_checkpoint(latest).sha256


def test_a_killed_tensor_parallel_rank_restarts_from_its_shards_on_s3(
    model_runs, runs_dir, s3, tmp_path
):
    """The tiny Llama in 2 tensor-parallel shards (DeepSpeed given the grid as its mpu, ZeRO-1
    over one replica) with its checkpoints on S3: rank 1 dies at step 14, the worker group
    restarts from the step-12 checkpoint, each rank loading its own shard back from S3, and the
    run ends with the uninterrupted run's losses. Its shards then export to the model it
    evaluated."""
    layout = {"zero_stage": 1, "tensor_parallel": 2, "micro_batch_size": 8}
    uninterrupted = model_runs("tiny-llama.yaml", "llama-tp2", pipeline_stages=1, **layout)
    job = shipped_job("tiny-llama.yaml", "llama-tp2-faulty", f"{s3}/runs", **layout)
    job = job.model_copy(
        update={
            "failure": job.failure.model_copy(update={"max_failures": 1}),
            "tracking": TrackingSpec(),  # the default stores, kept on S3 beside the checkpoints
        }
    )
    marker = runs_dir / "tp2-fault-happened"

    result = run_training(job, fault=Fault(rank=1, step=14, marker=str(marker)))

    assert marker.exists(), "rank 1 really exited"
    assert result.final["step"] == 24
    restarted = [row for row in result.history if row.get("resumed_from_step") == 12]
    assert restarted, "the worker group restarted from the step-12 checkpoint on S3"
    assert losses(result) == pytest.approx(losses(uninterrupted), rel=1e-5)
    assert_tracked_once(f"{s3}/runs/{job.name}", result, tmp_path / "tracking")
    saved = local_copy(latest_checkpoint(job.storage, job.name), tmp_path / "download")
    model = load_exported_model(export_checkpoint(saved))
    assert validation_loss(model, job) == pytest.approx(result.final["val_loss"], rel=1e-5)


def test_checkpoints_are_pruned_to_keep_checkpoints(layouts, runs_dir):
    layouts("zero2", zero_stage=2, checkpoint_every=6)
    kept = saved_checkpoints(str(runs_dir), "zero2")
    assert [c.step for c in kept] == [18, 24]
    assert kept[-1].job["train"]["zero_stage"] == 2


def test_every_ray_process_queries_its_own_cluster(ray_session):
    """Train V2's placement-group cleaner asks Ray's state API, from inside the cluster, whether
    the run's controller lives. It must reach this cluster even when `ray start` left another
    cluster's address in /tmp/ray (a dead one would stall every run's shutdown)."""

    @ray_session.remote(num_cpus=0)
    class Probe:
        def ready(self) -> bool:
            return True

    @ray_session.remote(num_cpus=0)
    def state_seen_from_inside(actor_id: str) -> tuple[str, str]:
        import os

        from ray.util.state import get_actor

        return os.environ["RAY_ADDRESS"], get_actor(actor_id, timeout=10).state

    probe = Probe.remote()
    ray_session.get(probe.ready.remote())
    address, state = ray_session.get(state_seen_from_inside.remote(probe._actor_id.hex()))
    assert address == ray_session.get_runtime_context().gcs_address
    assert state == "ALIVE"
    ray_session.kill(probe)


def assert_tracked_once(location: str, result, folder) -> None:
    """The run's MLflow store and TensorBoard files, fetched from S3 into `folder`: one run,
    and each step once, with the loss the run first reported for it (a restarted worker
    group trains some steps again; the trackers keep the first)."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = open_store(location)
    for key in [*store.keys("tensorboard"), "mlflow.db"]:
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        store.download(key, folder / key)
    first = {}
    for row in result.history:
        first.setdefault(row["step"], row["loss"])
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == sorted(first.items())
    assert run.info.status == "FINISHED"
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == sorted(first)


def test_a_run_on_the_embedded_ray_starts_lean_and_says_how_long_it_took(
    layouts, ray_session, tmp_path
):
    """Nothing idles beside the ranks that a local run does not need: Ray Data's actors stop
    once a corpus is ready, and no run starts a preemption watcher (one node nobody drains).
    The run's first row breaks its start down, phase by phase."""
    from ray.util.state import list_actors

    from shipyard.data.corpus import prepare_corpus
    from shipyard.runtime.local import RAY_DATA_ACTORS

    result = layouts("zero1", zero_stage=1)
    first, second = result.history[:2]
    parts = [first[f"start_{part}_s"] for part in START_PARTS]
    assert all(part > 0 for part in parts), first
    assert first["start_s"] == pytest.approx(sum(parts))
    assert not any(key.startswith("start") for key in second)

    prepare_corpus(tiny_job("lean", tmp_path))  # a fresh corpus: Ray Data runs
    for name, namespace in RAY_DATA_ACTORS:
        with pytest.raises(ValueError):
            ray_session.get_actor(name, namespace=namespace)
    gcs = ray_session.get_runtime_context().gcs_address
    started = {actor.class_name for actor in list_actors(address=gcs, limit=10_000)}
    assert "TrainController" in started
    assert "PreemptionWatcher" not in started
