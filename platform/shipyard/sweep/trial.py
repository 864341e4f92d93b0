"""One sweep trial: the job with the trial's values, trained as a Shipyard run inside Ray Tune.

Each trial is a Tune function that runs `run_training` on the sweep's warm ranks
(`shipyard.train.warm_ranks`) and forwards its reports. Every (re)start of a trial is a new
run: it continues from the checkpoint Tune hands it, which after a PBT exploit is another
trial's.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shipyard.data.corpus import Corpus
from shipyard.spec.job import JobSpec
from shipyard.storage import from_ray_storage, ray_storage, remove_folder
from shipyard.sweep.search_space import apply_overrides
from shipyard.train.checkpoint import SavedCheckpoint, read_checkpoint
from shipyard.train.warm_ranks import end_pool_runs

TRIAL_CPUS = 0.01  # the trial's own actor only forwards reports; its ranks hold the CPUs
# Tune reuses a stopped or paused trial's actor for the next trial once the trial's thread has
# ended, waiting this many seconds for it (2 by default) before it fails the next trial. The
# thread sees the stop within STOP_POLL_S, but then ends its run's tracking and scratch folder.
THREAD_END_GRACE = ("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")


def trial_job(base: JobSpec, values: dict[str, Any], run_name: str, storage: str) -> JobSpec:
    """`base` with one trial's values, as a plain training job named `run_name`.

    Its Train run keeps every checkpoint: the trial's thread hands each to Tune one report at
    a time, and may lag behind the ranks, so a checkpoint Ray Train pruned by its own count
    could be gone before Tune copies it. `run_trial` removes each once Tune has its copy."""
    job = apply_overrides(base, values, source=f"sweep trial {run_name}")
    train = job.train
    every_checkpoint = train.max_steps // train.checkpoint_every + 1  # + the last step's
    return job.model_copy(
        update={
            "name": run_name,
            "storage": storage,
            "sweep": None,
            "train": train.model_copy(update={"keep_checkpoints": every_checkpoint}),
        }
    )


def corpus_key(job: JobSpec) -> str:
    """Jobs with equal keys train on the same tokens."""
    tokenizer = job.tokenizer.model_dump(mode="json") if job.tokenizer else None
    return json.dumps([job.data.model_dump(mode="json"), tokenizer])


def run_trial(
    config: dict[str, Any],
    *,
    base: dict,
    corpora: dict[str, Corpus],
    runs: str,
    tracking: dict[str, Any] | None = None,
    ranks=None,
) -> None:
    """Tune function trainable: train one trial, reporting each metric row (and checkpoint).

    The trial's runs write their checkpoints under `runs` (a folder, or S3 when the sweep's
    storage is), where every rank can reach them; Tune copies each reported one into the
    trial's own storage. `ranks` is the sweep's `RankPool` (None: a Ray Train run)."""
    from ray import tune

    from shipyard.train.trainer import RunStopped, run_training

    entered = time.time()
    os.environ.setdefault(*THREAD_END_GRACE)  # read by Tune in this process, at a reuse
    base_job = JobSpec.model_validate(base)
    metric = base_job.sweep.metric
    trial_id = tune.get_context().get_trial_id()
    run_name = f"{trial_id}-{uuid.uuid4().hex[:6]}"
    job = trial_job(base_job, config, run_name, runs)
    _, runs_filesystem = ray_storage(runs)
    start = tune.get_checkpoint()  # this trial's own after a resume; a better one's after PBT
    saved = read_checkpoint(from_ray_storage(start.path, start.filesystem)) if start else None
    origin = trial_of(saved) if saved else ""
    if saved and saved.step >= job.train.max_steps:
        # Nothing left to train (PBT paused a finished trial to keep its checkpoint).
        tune.report(
            {
                **saved.metrics,
                "already_complete": True,
                "trial_run": run_name,
                "started_from_trial": origin,
            }
        )
        return

    held: dict[str, Any] = {}  # a run's start breakdown, until a row Tune takes
    newest_copied: str | None = None  # Tune has its copy; kept for Train's failure restarts
    # Scratch checkpoints Tune has copied are deleted off the report path: a report that waits
    # on storage delays the scheduler's decisions while the ranks train on.
    pruner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shipyard-prune")

    def forward(row: dict[str, Any]) -> None:
        nonlocal newest_copied
        checkpoint = row.pop("checkpoint", None)
        if metric not in row:  # Tune wants its metric in every result
            held.update((key, value) for key, value in row.items() if key.startswith("start_"))
            return
        # Once Tune pauses or stops the trial, this waits until Tune reuses the actor, then
        # raises SystemExit: the run ends KILLED, and Tune's thread wrapper expects the exit.
        tune.report(
            {**held, **row, "trial_run": run_name, "started_from_trial": origin},
            checkpoint=_ray_checkpoint(checkpoint, runs_filesystem) if checkpoint else None,
        )
        held.clear()
        if checkpoint:  # Tune has its copy: the one before is no longer needed
            if newest_copied:
                pruner.submit(remove_folder, newest_copied)
            newest_copied = checkpoint

    held["start_trial_s"] = time.time() - entered  # Tune's call to the run's
    try:
        run_training(
            job,
            corpus=corpora[corpus_key(job)],
            start_checkpoint=start,
            on_metrics=forward,
            tracking_context=trial_context(tracking, trial_id, config, saved, origin),
            ranks=ranks,
            stop_requested=tune_stop_requested(),
        )
    except RunStopped:
        pass  # Tune ended this trial to give its actor to the next
    finally:
        # Tune keeps its own copy of every reported checkpoint; the run's folder is scratch.
        pruner.shutdown(wait=True, cancel_futures=True)
        remove_folder(f"{runs}/{run_name}")


def end_trial_runs(trial_id: str) -> None:
    """End the trial's run on the sweep's warm ranks now (its scheduler paused or stopped
    it): the run's names start with the trial's id."""
    end_pool_runs(f"{trial_id}-")


def tune_stop_requested() -> Callable[[], bool]:
    """Whether Tune has ended this trial's session, as it does before it reuses the trial's
    actor. Ray 2.60 shows that only as its session's stop event; the trial's thread would
    otherwise see it at its next `tune.report`, which may be many steps away."""
    from ray.train._internal.session import get_session

    return get_session().stop_event.is_set


def trial_context(
    tracking: dict[str, Any] | None,
    trial_id: str,
    values: dict[str, Any],
    saved: SavedCheckpoint | None = None,
    origin: str = "",
):
    """Where the trial records itself: a child of the sweep's MLflow run, its own TensorBoard
    folder, its record under the sweep (its Train runs come and go; the trial stays). A trial
    that restarts (ASHA's promotion, PBT's exploit) says from which step and whose checkpoint."""
    from shipyard.tracking.record import RunContext

    if not tracking:
        return None
    location = tracking["location"]
    folder = tracking["tensorboard"]
    return RunContext(
        parent_run_id=tracking["parent_run_id"],
        trial_id=trial_id,
        trial_values=values,
        record_location=f"{location}/tracking/{trial_id}",
        tensorboard_folder=f"{folder}/{trial_id}" if folder else None,
        mlflow_uri=tracking["mlflow_uri"],
        experiment=tracking["experiment"],
        tags={
            "shipyard.resumed_from_step": str(saved.step if saved else 0),
            "shipyard.started_from_trial": origin or trial_id,
            **restart_event(saved, origin, trial_id),
        },
    )


def restart_event(saved: SavedCheckpoint | None, origin: str, trial_id: str) -> dict[str, str]:
    """A tag per restart, named by its step, so the child run keeps every one: a paused trial
    that ASHA promotes (or a resumed sweep) continues its own checkpoint; a PBT exploit
    continues another trial's."""
    if saved is None:
        return {}
    how = (
        "continued its own checkpoint (ASHA promotion, or a resumed sweep)"
        if origin in ("", trial_id)
        else f"took trial {origin}'s checkpoint (PBT exploit)"
    )
    return {f"shipyard.restart_at_step_{saved.step}": how}


def _ray_checkpoint(uri: str, filesystem):
    """A checkpoint the trial's run reported, as the Tune checkpoint that Tune copies."""
    from ray import tune

    return tune.Checkpoint(uri.removeprefix("s3://"), filesystem=filesystem)


def trial_of(checkpoint: SavedCheckpoint) -> str:
    """The id of the trial whose run wrote `checkpoint` (run names start with it)."""
    return checkpoint.job["name"].rsplit("-", 1)[0]
