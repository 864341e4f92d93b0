"""Driver side of a sweep: decide the concurrency, build the corpora, run Ray Tune, resume.

The sweep lives in `<storage>/<job>-sweep/`, a folder or an S3 prefix: Tune's experiment
state and trials, the job the sweep was started with, the history of every result and (after
`report.write_results`) the results, plot and best job. With S3 storage, the history and the
report are written in a folder on this machine first (`local_mirror`), then uploaded.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from shipyard.data.corpus import Corpus, prepare_corpus
from shipyard.errors import ResourceError, SpecError
from shipyard.runtime.local import environment
from shipyard.spec.job import SWEEP_SUFFIX, JobSpec
from shipyard.storage import (
    local_mirror,
    mirrored_file,
    open_store,
    ray_storage,
    remove_folder,
)
from shipyard.sweep.history import HISTORY_FILE, TrialHistory
from shipyard.sweep.promotion import EndingAsha, Gate, PromotingAsha, Rungs
from shipyard.sweep.search_space import Dimension, apply_overrides, shapes_corpus
from shipyard.sweep.trial import TRIAL_CPUS, corpus_key, end_trial_runs, run_trial
from shipyard.tracking.record import read_record
from shipyard.train.warm_ranks import start_rank_pool, stop_rank_pool

SWEEP_JOB_FILE = "sweep-job.json"  # the job the sweep started with; a resume must match it
TRIAL_RUNS = "trial-runs"  # scratch folder of the trials' Train runs


@dataclass(frozen=True)
class SweepSetup:
    """What was decided before Tune starts."""

    location: str  # the sweep's folder or s3:// prefix
    concurrent_trials: int
    resumed: bool


def sweep_location(job: JobSpec) -> str:
    """Where the sweep of `job` keeps its state and results: a folder or an s3:// prefix."""
    return f"{job.storage.rstrip('/')}/{job.name}{SWEEP_SUFFIX}"


def sweep_folder(job: JobSpec) -> Path:
    """The sweep's folder on this machine: its history and report (with S3, their copies)."""
    return local_mirror(sweep_location(job))


def run_sweep(
    job: JobSpec,
    dimensions: tuple[Dimension, ...],
    *,
    callbacks: list[tune.Callback],
    must_resume: bool = False,
    on_setup=None,
) -> tuple[SweepSetup, tune.ResultGrid, list[str]]:
    """Run (or resume) the sweep of `job` on the connected Ray cluster until it ends or is
    interrupted; also returns the trials left unfinished (none unless interrupted)."""
    location = sweep_location(job)
    resuming = check_resumable_sweep(job, must_resume)
    setup = SweepSetup(
        location, concurrent_trials(job, dimensions, ray.cluster_resources()), resuming
    )
    if on_setup:
        on_setup(setup)
    tracking, trial_tracking = track_sweep(job, location)
    ranks = start_rank_pool(setup.concurrent_trials)  # warm ranks for every trial's runs
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=job.model_dump(mode="json"),
            corpora=build_corpora(job, dimensions),
            runs=f"{location}/{TRIAL_RUNS}",
            tracking=trial_tracking,
            ranks=ranks,
        ),
        {"CPU": TRIAL_CPUS},
    )
    storage = ray_storage(location)
    with mirrored_file(location, HISTORY_FILE):  # its rows are on S3 even after a Ctrl-C
        if resuming:
            path, filesystem = storage
            tuner = tune.Tuner.restore(
                path, trainable, resume_unfinished=True, storage_filesystem=filesystem
            )
        else:
            open_store(location).put_text(
                SWEEP_JOB_FILE, json.dumps(job.model_dump(mode="json"), indent=2)
            )
            history = TrialHistory(location, [dimension.path for dimension in dimensions])
            tuner = build_tuner(job, dimensions, trainable, setup, storage, [*callbacks, history])
        grid = None
        try:
            with tune_settings():
                grid = tuner.fit()
        finally:
            stop_rank_pool(ranks)
            if tracking:
                tracking.tag(best_trial_tags(grid, job))
                tracking.close("FINISHED" if grid is not None else "KILLED")
    unfinished = unfinished_trials(storage)
    if not unfinished:  # trials stopped by a Ctrl-C left their scratch runs
        remove_folder(f"{location}/{TRIAL_RUNS}")
    return setup, grid, unfinished


# Tune's CSV and JSON result files, but not its TensorBoardX files (or its hint to open them in
# Ray's temporary folder, deleted when Ray stops): Shipyard writes TensorBoard folders per trial
# that outlive Ray (tracking.tensorboard).
NO_TENSORBOARDX = ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Tune saves the sweep's state after every trial checkpoint once it prunes checkpoints
# (`num_to_keep`), and warns each time that happens within 5 s of the last: several times a
# second in a sweep that checkpoints often. Kept quiet unless the user set a threshold.
NO_SNAPSHOT_WARNINGS = ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


@contextmanager
def tune_settings() -> Iterator[None]:
    """Shipyard's Tune settings in this process's environment while the sweep runs: no
    TensorBoardX files (always), no snapshot warnings (unless the user chose a threshold)."""
    chosen = dict([NO_TENSORBOARDX])
    if NO_SNAPSHOT_WARNINGS[0] not in os.environ:
        chosen.update([NO_SNAPSHOT_WARNINGS])
    with environment(chosen):
        yield


def track_sweep(job: JobSpec, location: str) -> tuple[Any, dict[str, Any]]:
    """The sweep's parent MLflow run (continued on a resume), and what each trial needs to
    record itself as its child: the parent's id, the MLflow URI, TensorBoard's folder."""
    from shipyard.tracking.record import RunContext, flatten, job_params
    from shipyard.tracking.setup import open_tracking

    parent_job = job.model_copy(
        update={"tracking": job.tracking.model_copy(update={"tensorboard": False})}
    )
    params = {**job_params(job, {}), **flatten(job.sweep.model_dump(mode="json"), "sweep.")}
    tags = {"shipyard.job": job.name, "shipyard.kind": "sweep"}
    context = RunContext(record_location=location)
    tracking, places = open_tracking(parent_job, params, tags, context)
    parent = None
    if tracking:
        tracking.wait()
        parent = read_record(location).get("mlflow_run_id")
    tensorboard = job.tracking.tensorboard
    folder = tensorboard if isinstance(tensorboard, str) else f"{location}/tensorboard"
    return tracking, {
        "location": location,
        "parent_run_id": parent,
        "mlflow_uri": places.mlflow_uri,
        "experiment": (job.tracking.mlflow.experiment if job.tracking.mlflow else None) or job.name,
        "tensorboard": folder if tensorboard else None,
    }


def best_trial_tags(grid: tune.ResultGrid | None, job: JobSpec) -> dict[str, str]:
    """The best trial so far, for the sweep's parent run."""
    if grid is None:
        return {}
    try:
        best = grid.get_best_result(metric=job.sweep.metric, mode=job.sweep.mode, scope="all")
    except (RuntimeError, ValueError):
        return {}
    metric = best.metrics.get(job.sweep.metric) if best.metrics else None
    trial = best.metrics.get("trial_id") if best.metrics else None
    return {"shipyard.best_trial": str(trial), f"shipyard.best_{job.sweep.metric}": str(metric)}


def check_resumable_sweep(job: JobSpec, must_resume: bool = False) -> bool:
    """Whether a saved sweep of `job` will be resumed; errors if it cannot or must but can't."""
    location = sweep_location(job)
    path, filesystem = ray_storage(location)
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        check_same_sweep(location, job)
        return True
    if must_resume:
        raise SpecError(
            f"sweep: there is no interrupted sweep of job {job.name!r} in {location} to "
            "resume. To fix: run without --resume to start it."
        )
    return False


def unfinished_trials(storage: tuple[str, Any]) -> list[str]:
    """Trials the saved sweep state (at `ray_storage`'s path and file system) has not
    finished (an interrupted sweep has some)."""
    path, filesystem = storage
    analysis = tune.ExperimentAnalysis(path, storage_filesystem=filesystem)
    return [trial.trial_id for trial in analysis.trials if not trial.is_finished()]


def build_tuner(job, dimensions, trainable, setup: SweepSetup, storage, callbacks) -> tune.Tuner:
    """The Tuner for a new sweep: search space, search algorithm, scheduler, and its storage
    (`ray_storage` of the sweep's location).

    A trial's actor is reused for the next trial (its process, imports and connections kept).
    A trial that ASHA or PBT stops or pauses is still inside `run_trial`, its run going on;
    Tune ends its session before the reuse, and `run_trial` then leaves the run within a
    quarter of a second (its warm ranks leave within a step) and ends well inside the grace
    Tune gives it (`THREAD_END_GRACE`). An actor Tune does not reuse ends, its run with it."""
    sweep = job.sweep
    path, filesystem = storage
    return tune.Tuner(
        trainable,
        param_space={dimension.path: dimension.to_tune() for dimension in dimensions},
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            **search_and_scheduler(job, dimensions, setup.concurrent_trials),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=path.rsplit("/", 1)[1],
            storage_path=path.rsplit("/", 1)[0],
            storage_filesystem=filesystem,
            checkpoint_config=tune.CheckpointConfig(
                # PBT may hand any trial's latest checkpoint to another later: keep them all.
                num_to_keep=None if sweep.scheduler == "pbt" else job.train.keep_checkpoints,
                checkpoint_score_attribute=sweep.metric,
                checkpoint_score_order=sweep.mode,
            ),
            # A trial's Train run restarts failed workers itself (job.failure).
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[*callbacks, CSVLoggerCallback(), JsonLoggerCallback()],
            verbose=0,
        ),
    )


def search_and_scheduler(
    job: JobSpec, dimensions: tuple[Dimension, ...], concurrent_trials: int
) -> dict[str, Any]:
    """TuneConfig's search_alg and scheduler. With ASHA's promotion: pause the scheduler
    caps the running trials (paused ones hold no slot) through a gate on the search."""
    asha = job.sweep.asha_settings
    if job.sweep.scheduler != "asha" or asha.promotion != "pause":
        return {
            "search_alg": search_algorithm(job, concurrent_trials),
            "scheduler": scheduler(job, dimensions),
        }
    train = job.train
    rungs = Rungs.between(
        asha.grace_period, asha.reduction_factor, train.max_steps, train.checkpoint_every
    )
    promoting = PromotingAsha(rungs, train.max_steps, concurrent_trials, end_trial_runs)
    return {"search_alg": Gate(search_algorithm(job, None), promoting), "scheduler": promoting}


def search_algorithm(job: JobSpec, concurrent_trials: int | None):
    """Random sampling (grid entries expanded), or Optuna's TPE; seeded, concurrency-capped
    unless `concurrent_trials` is None."""
    sweep = job.sweep
    if sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter, SearchGenerator
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(seed=sweep.seed)
        if concurrent_trials is None:
            return SearchGenerator(optuna)
        return ConcurrencyLimiter(optuna, concurrent_trials)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent_trials or 0)


def scheduler(job: JobSpec, dimensions: tuple[Dimension, ...]):
    """FIFO, ASHA (Tune's percentile rule) or PBT, all counting time in optimizer steps."""
    sweep = job.sweep
    if sweep.scheduler == "asha":
        settings = sweep.asha_settings
        return EndingAsha(
            end_trial_runs,
            time_attr="step",
            max_t=job.train.max_steps,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
    if sweep.scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        settings = sweep.pbt_settings
        return PopulationBasedTraining(
            time_attr="step",
            perturbation_interval=settings.perturbation_interval,
            quantile_fraction=settings.quantile_fraction,
            resample_probability=settings.resample_probability,
            synch=settings.synch,
            hyperparam_mutations={d.path: d.to_mutation() for d in dimensions},
        )
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def concurrent_trials(job: JobSpec, dimensions: tuple[Dimension, ...], cluster: dict) -> int:
    """How many trials run at once: what the cluster fits, capped by max_concurrent_trials.

    Tune only reserves each trial's small driver; its Train workers ask Ray for their CPUs
    later, so trials beyond what fits would wait on each other's workers and time out.
    """
    sweep = job.sweep
    per_trial = max(_trial_cpus(job, values) for values in _corners(job, dimensions))
    fits = math.floor(cluster.get("CPU", 0.0) / per_trial + 1e-9)
    if fits < 1:
        raise ResourceError(
            f"sweep: one trial needs {per_trial:g} CPUs (train.num_workers × "
            f"train.cpus_per_worker, plus {TRIAL_CPUS} for the trial), but the Ray cluster has "
            f"{cluster.get('CPU', 0.0):g}. To fix: lower train.cpus_per_worker or "
            "train.num_workers, or use a bigger cluster."
        )
    wanted = sweep.max_concurrent_trials or fits
    if sweep.scheduler == "pbt" and sweep.num_samples > fits:
        raise ResourceError(
            f"sweep.num_samples: pbt compares a population that trains together, but only "
            f"{fits} trials of {per_trial:g} CPUs fit at once on this Ray cluster. To fix: "
            f"use num_samples <= {fits}, fewer CPUs per trial, or a bigger cluster."
        )
    return max(1, min(wanted, fits))


def _trial_cpus(job: JobSpec, values: dict[str, Any]) -> float:
    trial = apply_overrides(job, values, source="sweep") if values else job
    return trial.train.num_workers * trial.train.cpus_per_worker + TRIAL_CPUS


def _corners(job: JobSpec, dimensions: tuple[Dimension, ...]) -> list[dict[str, Any]]:
    """Trial values at every combination of the resource fields' extremes."""
    resource_fields = ("train.num_workers", "train.cpus_per_worker")
    chosen = [d for d in dimensions if d.path in resource_fields]
    return [
        dict(zip([d.path for d in chosen], values, strict=True))
        for values in itertools.product(*(d.extremes() for d in chosen))
    ]


def build_corpora(job: JobSpec, dimensions: tuple[Dimension, ...]) -> dict[str, Corpus]:
    """Every corpus a trial can ask for, built here once while the CPUs are free.

    Trials then need no Ray Data tasks, which could not run while other trials' workers hold
    the cluster's CPUs.
    """
    chosen = [d for d in dimensions if shapes_corpus(d.path)]
    corpora: dict[str, Corpus] = {}
    for values in itertools.product(*(_all_values(d) for d in chosen)):
        trial = apply_overrides(
            job, dict(zip([d.path for d in chosen], values, strict=True)), "sweep"
        )
        key = corpus_key(trial)
        if key not in corpora:
            corpora[key] = prepare_corpus(trial)
    return corpora


def _all_values(dimension: Dimension) -> list[Any]:
    if dimension.distribution == "randint":
        low, high = dimension.values
        return list(range(low, high + 1))
    return list(dimension.values)


def check_same_sweep(location: str, job: JobSpec) -> None:
    """Refuse to resume a sweep whose job has changed since it started."""
    saved_text = open_store(location).get_text(SWEEP_JOB_FILE)
    if saved_text is None:
        return
    saved, new = json.loads(saved_text), job.model_dump(mode="json")
    changed = _first_difference(saved, new)
    if changed:
        path, before, after = changed
        raise SpecError(
            f"{path}: {after!r} differs from {before!r} in the sweep saved at {location}, which "
            f"job {job.name!r} would resume. To fix: give the job a new name for a new sweep, "
            "or change the field back; the saved sweep is left untouched."
        )


def _first_difference(before: Any, after: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after)):
            found = _first_difference(before.get(key), after.get(key), f"{path}.{key}".lstrip("."))
            if found:
                return found
        return None
    return None if before == after else (path, before, after)
