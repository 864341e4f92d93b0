"""Warm ranks, the processes a sweep's trials train on, on the session's Ray."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from shipyard.train.trainer import run_training
from shipyard.train.warm_ranks import end_pool_runs, start_rank_pool, stop_rank_pool
from shipyard.train.worker import Fault
from tests.integration.conftest import tiny_job

pytestmark = pytest.mark.integration


class Leave(Exception):
    """What the test's metrics callback raises to walk away from a run, as a stopped trial."""


def test_a_warm_gang_trains_run_after_run_exactly_and_outlives_failures_and_leavers(
    ray_session, tmp_path
):
    """One gang (a pool of at most one) trains four runs of the same job one after another:
    - the second reuses the first's processes (it imported nothing) and trains exactly as the
      fresh one did;
    - in the third a rank dies after step 6: a new gang continues from the step-4 checkpoint
      and ends where an uninterrupted run ends;
    - the fourth is ended through the pool at its first report while its owner still waits
      there, as a paused trial's is: its ranks leave within a step or so, and the fifth gets
      their gang back before the owner moves on (the pool holds one, never needs another)."""

    def job(name: str):
        return tiny_job(name, tmp_path, max_steps=8, checkpoint_every=4, eval_every=4, log_every=2)

    def rows(result) -> list[tuple]:
        return [(row["step"], row["loss"], row.get("val_loss")) for row in result.history]

    pool = start_rank_pool(1)
    try:
        first = run_training(job("first"), ranks=pool)
        second = run_training(job("second"), ranks=pool)
        assert first.history[0]["start_imports_s"] > 0  # a new process imports torch
        assert second.history[0]["start_imports_s"] == 0  # ...and keeps it for the next run
        assert rows(second) == rows(first)
        assert first.final["loss"] < first.history[0]["loss"]
        assert second.checkpoint_path.endswith("second/checkpoint_000008")

        marker = tmp_path / "fault"
        third_job = job("third")
        retried = third_job.failure.model_copy(update={"max_failures": 1})
        third = run_training(
            third_job.model_copy(update={"failure": retried}),
            fault=Fault(rank=1, step=6, marker=str(marker)),
            ranks=pool,
        )
        assert marker.read_text().startswith("rank 1 exited at step 6")
        restarted = [row for row in third.history if row.get("resumed_from_step") == 4]
        assert restarted, "the run did not continue from its step-4 checkpoint"
        assert restarted[0]["start_imports_s"] > 0  # on a new gang's new processes
        assert rows(third)[-1] == rows(first)[-1]

        paused, released = threading.Event(), threading.Event()

        def pause(row):  # a paused trial's report waits; its scheduler ends its run meanwhile
            end_pool_runs("fourth")
            paused.set()
            released.wait(timeout=300)
            raise Leave

        owners = ThreadPoolExecutor(max_workers=2)
        try:
            fourth = owners.submit(run_training, job("fourth"), ranks=pool, on_metrics=pause)
            assert paused.wait(timeout=300)
            # The pool's one gang is the fourth's until its ranks leave: never, if they missed it.
            fifth = owners.submit(run_training, job("fifth"), ranks=pool).result(timeout=300)
            released.set()
            with pytest.raises(Leave):
                fourth.result(timeout=60)
        finally:
            released.set()
            owners.shutdown(wait=False)
        assert fifth.history[0]["start_imports_s"] == 0
        assert rows(fifth) == rows(first)
        assert ray_session.get(pool.size.remote()) == 1
    finally:
        stop_rank_pool(pool)
