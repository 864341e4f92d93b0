"""What a rank asks of the run it belongs to: its rank, its device, where to resume from, and
where its reports and checkpoints go.

A job's run is a Ray Train run (`RayTrainSession`). A sweep trial runs on warm ranks that
outlive it (`shipyard.train.warm_ranks`), which answer the same questions without Ray Train.
"""

from __future__ import annotations

from typing import Any, Protocol

import psutil
import ray.train
import torch

from shipyard.plan.plan import ParallelPlan


class RankSession(Protocol):
    def world_rank(self) -> int: ...

    def device(self, plan: ParallelPlan) -> torch.device: ...

    def created_at(self) -> float | None:
        """When this rank's start began (its process's creation), or None if its process was
        already running (a warm rank's later run): then its start is the run's own."""
        ...

    def own_checkpoint(self) -> ray.train.Checkpoint | None:
        """This run's latest committed checkpoint after a failure restart, else None."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None) -> bool:
        """Hand in this rank's metrics (rank 0's are the run's) and its files of a checkpoint,
        a local folder the session then owns. False: nobody wants this run any more."""
        ...

    def wait_for_commit(self) -> None:
        """Return once every checkpoint reported so far is committed."""
        ...

    def keep_going(self) -> bool:
        """Asked after every step, by every rank together: False once nobody wants the run."""
        ...


class RayTrainSession:
    """A rank of a Ray Train run: Ray Train numbers it, uploads, commits and restarts."""

    def world_rank(self) -> int:
        return ray.train.get_context().get_world_rank()

    def device(self, plan: ParallelPlan) -> torch.device:
        if plan.device == "cuda":
            import ray.train.torch

            device = ray.train.torch.get_device()
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def created_at(self) -> float:
        return psutil.Process().create_time()

    def own_checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None) -> bool:
        if checkpoint_folder is None:
            ray.train.report(metrics)
            return True
        # Ray merges all ranks' files into one checkpoint. The copy to storage runs on Ray
        # Train's upload thread while this rank trains on; the checkpoint is registered (and
        # ever resumed from) only once every rank's copy is done.
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint_folder),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )
        return True

    def keep_going(self) -> bool:
        return True  # Ray Train ends its own runs

    def wait_for_commit(self) -> None:
        # Ray Train collects reports by polling workers; a rank that dies first takes its last
        # report with it.
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=60
        )
