"""Driver side of training: check, build the Ray TorchTrainer from a plan, run it, summarise."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Empty, Queue

from shipyard.data.corpus import Corpus, prepare_corpus
from shipyard.errors import ResourceError, SpecError, TrainingError
from shipyard.plan.plan import ParallelPlan, make_plan
from shipyard.runtime.local import environment, is_embedded, wants_full_ray
from shipyard.spec.cluster import ClusterSpec
from shipyard.spec.job import JobSpec
from shipyard.storage import from_ray_storage, mirrored_file, ray_storage
from shipyard.tracking.record import RunContext, RunTracking, job_params
from shipyard.tracking.setup import TrackingPlaces, open_tracking, submission_tags
from shipyard.train.checkpoint import SavedCheckpoint, latest_checkpoint, resume_changes
from shipyard.train.entry import ForwardMetrics, train_loop

if TYPE_CHECKING:  # the ranks' module: it imports DeepSpeed, which the driver never needs
    from shipyard.train.worker import Fault

Metrics = dict[str, Any]
METRICS_FILE = "metrics.jsonl"  # every reported row of every invocation, in order
# Ray Train's controller takes a worker's report only when it polls the workers, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a worker's next report waits for that:
# a job reporting more often is paced by the poll (the test model: 0.5 s a step instead of
# 0.065 s). Shipyard's runs poll every 0.25 s unless the variable is set.
POLL_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
METRICS_SWITCH = "RAY_TRAIN_METRICS_ENABLED"
PYDANTIC_FOOTER = "For further information visit"  # the last line of a ValidationError
FIT_DONE = "fit done"  # the last item of a run's metrics queue
# The phases of a run's start, each a `start_<phase>_s` metric of its first row; they add up to
# `start_s` (launch: the driver's; the rest: rank 0's StartClock).
START_PARTS = ("launch", "imports", "setup", "first_step")
ROW_WAIT_S = 5  # the driver's wait on the metrics queue between chances to see Ctrl-C
STOP_POLL_S = 0.25  # ...and between looks at `stop_requested`


@dataclass
class TrainResult:
    """What a training run produced: every reported metric row, the last one, the checkpoint,
    and where it was tracked."""

    history: list[Metrics] = field(default_factory=list)
    checkpoint_path: str | None = None
    tracking: TrackingPlaces | None = None

    @property
    def final(self) -> Metrics:
        """The last metrics reported (empty if nothing was reported)."""
        return self.history[-1] if self.history else {}


def run_training(
    job: JobSpec,
    *,
    plan: ParallelPlan | None = None,
    on_metrics: Callable[[Metrics], None] | None = None,
    on_corpus: Callable[[Corpus], None] | None = None,
    stop_at_step: int | None = None,
    fault: Fault | None = None,
    corpus: Corpus | None = None,
    start_checkpoint: ray.train.Checkpoint | None = None,
    tracking_context: RunContext | None = None,
    ranks=None,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `job` on the Ray cluster this process is connected to; resumes if it can.

    `plan` is the job placed on the joined cluster (`plan_for`): ranks go to the node types it
    picks, with its layer and batch splits; without one, the job runs as written.
    `stop_at_step` ends this invocation early (with a checkpoint) so a later run can continue.
    `corpus` reuses a corpus already built for the job's data; `start_checkpoint` starts a new
    run from a checkpoint of the same model layout (a sweep trial continuing another trial's).
    `tracking_context` places the run in a sweep's tracking (its parent run and folders).
    `ranks`, a sweep's `RankPool`, runs it on warm ranks instead of a new Ray Train run.
    `stop_requested` is asked 4 times a second; once it says so, the run is left (`RunStopped`).
    """
    began = time.time()
    plan = plan or make_plan(job)
    check_resources(plan, ray.cluster_resources())
    resumed = check_resumable(job, plan)
    if corpus is None:
        corpus = prepare_corpus(job)
    check_same_corpus(job, resumed, corpus)  # the same source may hold other text now
    check_enough_data(corpus, plan, job)
    if on_corpus:
        on_corpus(corpus)
    metrics_queue = Queue(actor_options={"num_cpus": 0})
    if ranks is None:
        trainer = build_trainer(
            job, plan, corpus, metrics_queue, stop_at_step, fault, start_checkpoint
        )
    else:
        from shipyard.train.warm_ranks import WarmRun

        config = rank_config(job, plan, corpus, stop_at_step, fault, start_checkpoint)
        trainer = WarmRun(ranks, job, plan, config, metrics_queue)
    tags = {"shipyard.job": job.name, **submission_tags()}
    tracking, places = open_tracking(job, job_params(job, plan.summary()), tags, tracking_context)
    result = TrainResult(tracking=places)
    status = "FAILED"
    try:
        with metrics_log(job) as log, ray_train_settings():
            record = metrics_recorder(log, on_metrics, tracking)
            outcome = _fit_forwarding_metrics(
                trainer, metrics_queue, result.history, record, began, stop_requested
            )
        finished = result.final.get("step", 0) >= job.train.max_steps
        status = "FINISHED" if finished else "KILLED"
    except ray.train.TrainingFailedError as error:
        raise TrainingError(f"training job {job.name!r} failed: {_worker_message(error)}") from None
    except ray.exceptions.RayError as error:  # a warm rank's, or its process's end
        if ranks is None:
            raise
        raise TrainingError(f"training job {job.name!r} failed: {_root_line(error)}") from None
    except (KeyboardInterrupt, RunStopped, SystemExit):  # SystemExit: Tune ended the trial
        status = "KILLED"
        raise
    finally:
        ray.kill(metrics_queue.actor)
        if tracking:
            tracking.close(status)
    if outcome.checkpoint:
        checkpoint = outcome.checkpoint
        result.checkpoint_path = from_ray_storage(checkpoint.path, checkpoint.filesystem)
    return result


def plan_for(job: JobSpec, cluster: ClusterSpec | None) -> ParallelPlan:
    """The job as written, or placed on `cluster` with the measured speeds cached for it."""
    if cluster is None:
        return make_plan(job)
    from shipyard.plan.profile import load_profiles

    return make_plan(job, cluster, load_profiles(job))


@contextmanager
def ray_train_settings() -> Iterator[None]:
    """Ray Train's settings for Shipyard's runs, in this process's environment while a run
    starts (Ray Train reads them here or hands them to its controller), unless the user chose
    a value: POLL_INTERVAL, and on the lean embedded Ray no metrics callbacks (their
    Prometheus metrics go nowhere there)."""
    settings = dict([POLL_INTERVAL])
    if is_embedded() and not wants_full_ray():
        settings[METRICS_SWITCH] = "0"
    chosen = {name: value for name, value in settings.items() if name not in os.environ}
    with environment(chosen):
        yield


def metrics_log(job: JobSpec):
    """The job's metrics.jsonl in its run folder. With S3 storage the log lives beside the
    checkpoints (`mirrored_file`), so a resume on another machine continues it."""
    return mirrored_file(job.storage, f"{job.name}/{METRICS_FILE}")


def metrics_recorder(
    path: Path, on_metrics, tracking: RunTracking | None = None
) -> Callable[[Metrics], None]:
    """Appends each metrics row to the log at `path`, hands it to the trackers, then calls
    `on_metrics`."""

    def record(row: Metrics) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as file:
            file.write(json.dumps(row) + "\n")
        if tracking:
            tracking.record(row)
        if on_metrics:
            on_metrics(row)

    return record


class RunStopped(Exception):
    """The run's caller asked it to stop (a sweep trial that Tune ends to reuse its actor)."""


def _fit_forwarding_metrics(
    trainer, metrics_queue, history, on_metrics, began: float, stop_requested=None
) -> ray.train.Result:
    """Run `trainer.fit()` on a helper thread while this thread forwards metrics as they come.

    Off the main thread, Ray Train installs no SIGINT handler of its own, so Ctrl-C reaches the
    caller as KeyboardInterrupt and the command can shut Ray down and say how to resume.
    The helper thread ends the queue with FIT_DONE, so this one waits on the queue alone
    (a few calls a minute to the queue's actor rather than a poll every half second), or
    every STOP_POLL_S when it must also watch `stop_requested`.
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:
            outcome["error"] = error
        finally:
            with suppress(Exception):  # the queue is gone if this run was interrupted
                metrics_queue.put(FIT_DONE)

    thread = threading.Thread(target=fit, name="shipyard-fit", daemon=True)
    thread.start()
    wait = STOP_POLL_S if stop_requested else ROW_WAIT_S
    while (row := _next_row(metrics_queue, wait)) != FIT_DONE:
        if stop_requested and stop_requested():
            raise RunStopped  # the ranks see the queue end (run_training's cleanup) and leave
        if row is not None:
            row = _with_launch_time(row, began)
            history.append(row)
            if on_metrics:
                on_metrics(row)
        elif not thread.is_alive():
            break
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _with_launch_time(row: Metrics, began: float) -> Metrics:
    """A run's first row, with rank 0's process creation made the seconds from `began` (the
    run's call) to it: the controller, placement and actor start (`start_launch_s`), and the
    whole start to the first step done (`start_s`)."""
    if "start_created_at" not in row:
        return row
    row = dict(row)
    row["start_launch_s"] = row.pop("start_created_at") - began
    row["start_s"] = sum(row[f"start_{part}_s"] for part in START_PARTS)
    return row


def _next_row(metrics_queue, wait: float) -> Metrics | str | None:
    """The queue's next item, or None after `wait` seconds without one (a chance for Ctrl-C)."""
    try:
        return metrics_queue.get(timeout=wait)
    except Empty:
        return None


def build_trainer(
    job: JobSpec,
    plan: ParallelPlan,
    corpus: Corpus,
    metrics_queue: Queue,
    stop_at_step: int | None = None,
    fault: Fault | None = None,
    start_checkpoint: ray.train.Checkpoint | None = None,
) -> TorchTrainer:
    """The TorchTrainer that runs `train_loop` on every rank as the plan says."""
    resources = {"CPU": plan.cpus_per_worker}
    if plan.gpus_per_worker:
        resources["GPU"] = plan.gpus_per_worker
    storage_path, storage_filesystem = ray_storage(job.storage)
    return TorchTrainer(
        train_loop,
        train_loop_config=rank_config(job, plan, corpus, stop_at_step, fault, start_checkpoint),
        torch_config=TorchConfig(backend=plan.backend),
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.device == "cuda",
            resources_per_worker=resources,
            label_selector=placement(plan),
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=job.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
            callbacks=[ForwardMetrics(metrics_queue)],
        ),
    )


def rank_config(
    job: JobSpec,
    plan: ParallelPlan,
    corpus: Corpus,
    stop_at_step: int | None,
    fault: Fault | None,
    start_checkpoint: ray.train.Checkpoint | None,
) -> dict[str, Any]:
    """What every rank is given (`run_rank`'s config): plain data and a checkpoint."""
    return {
        "job": job.model_dump(mode="json"),
        "plan": plan.to_dict(),
        "stop_at_step": stop_at_step,
        "fault": asdict(fault) if fault else None,
        "start_checkpoint": start_checkpoint,
        "corpus": corpus.to_dict(),
        "corpus_filesystem": ray_storage(corpus.location)[1],
    }


def placement(plan: ParallelPlan) -> list[dict[str, str]] | None:
    """Per rank, the node labels of the node type the plan put it on (Ray Train's per-worker
    label selectors), on a cluster with more than one node type.

    Ray Train numbers ranks by node in bundle order, and the plan lists each node type's ranks
    together, so rank r lands on plan rank r's node type; each worker checks that it did.
    """
    if not plan.select_nodes:
        return None  # one node type: any node with the resources will do
    return [dict(rank.node_selector) for rank in plan.ranks]


def check_resources(plan: ParallelPlan, cluster: dict[str, float]) -> None:
    """Fail now, clearly, if the cluster can never fit the workers (Ray would wait forever)."""
    for resource, per_worker in (("CPU", plan.cpus_per_worker), ("GPU", plan.gpus_per_worker)):
        needed = per_worker * plan.num_workers
        available = cluster.get(resource, 0.0)
        if needed > available:
            field_name = "cpus_per_worker" if resource == "CPU" else "gpus_per_worker"
            raise ResourceError(
                f"train.num_workers {plan.num_workers} × train.{field_name} {per_worker:g} needs "
                f"{needed:g} {resource}s, but the Ray cluster has {available:g}. To fix: lower "
                f"train.{field_name} or train.num_workers, or use a bigger cluster."
            )


def check_resumable(job: JobSpec, plan: ParallelPlan) -> SavedCheckpoint | None:
    """The checkpoint the job resumes from, if any, refused if this job (as planned) would not
    continue it exactly: a different model or layout would corrupt it, and a changed seed,
    batch, precision or schedule would silently make another run than the one that stopped."""
    saved = latest_checkpoint(job.storage, job.name)
    if saved is not None:
        _refuse_changes(
            job, saved, resume_changes(saved, job.model_dump(mode="json"), plan.to_dict())
        )
    return saved


def check_same_corpus(job: JobSpec, saved: SavedCheckpoint | None, corpus: Corpus) -> None:
    """Refuse to resume `saved` on other tokens than it trained on (its corpus key)."""
    if saved is not None and saved.corpus not in (None, corpus.key):
        changes = [("data.source (its content, tokenized)", saved.corpus, corpus.key)]
        _refuse_changes(job, saved, changes)


def _refuse_changes(job: JobSpec, saved: SavedCheckpoint, changes: list[tuple]) -> None:
    if changes:
        listed = "\n".join(
            f"  {path}: {after!r} differs from {before!r}" for path, before, after in changes
        )
        raise SpecError(
            f"job {job.name!r} would resume from the checkpoint at {saved.path} (step "
            f"{saved.step}), which was trained otherwise:\n{listed}\nTo fix: change these "
            "back to resume it exactly, or give the job a new name to start afresh; the saved "
            "checkpoint is left untouched."
        )


def check_enough_data(corpus: Corpus, plan: ParallelPlan, job: JobSpec) -> None:
    """Each split needs at least one global micro-batch (every replica's share of one)."""
    needed = sum(plan.micro_batches)
    length = job.model.sequence_length
    for split, name in (("train", "training"), ("validation", "validation")):
        windows = corpus.windows(split, length)
        if windows < needed:
            raise SpecError(
                f"data.source: {corpus.source!r} gives {windows} {name} windows of "
                f"{length + 1} tokens ({corpus.tokens[split]:,} tokens from "
                f"{corpus.documents[split]} documents), fewer than the {needed} one micro-step "
                f"takes (train.micro_batch_size {plan.micro_batch_size} × "
                f"{plan.data_parallel_size} replicas). To fix: use more text, a shorter "
                "model.sequence_length or a smaller micro-batch."
            )


def _worker_message(error: Exception) -> str:
    """The root cause a worker (or Ray Train's controller) raised, without Ray's wrapping."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        return f"rank {rank}: {_root_line(failure)}"
    controller = getattr(error, "controller_failure", None)
    if controller is not None:  # e.g. its storage could not be written
        return f"Ray Train's controller: {_root_line(controller)}"
    return str(error).strip().splitlines()[0]


def _root_line(failure: BaseException) -> str:
    """The last line of the innermost cause's text (its message, not its traceback): Ray's
    wrappers name theirs `cause`, Python's chained exceptions `__cause__`."""
    cause, inner = failure, failure
    while inner is not None:
        cause, inner = inner, getattr(inner, "cause", None) or inner.__cause__
    text = [
        line
        for line in str(cause).strip().splitlines()
        if not line.strip().startswith(PYDANTIC_FOOTER)
    ]
    return text[-1].strip() if text else type(cause).__name__
