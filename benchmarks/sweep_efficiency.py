"""Training steps ASHA and random search spend to find a config within 2% of the best loss.

Both sweeps draw the same configs (one search space, one seed). Random search trains every
trial to the end; ASHA stops the weak ones at its rungs. For each, walk the trials' reports in
time order and count the steps trained by all trials until some trial first reports a
validation loss within 2% of the best either sweep found. Prints both counts, their ratio
(goal: ASHA needs at least 3x fewer) and each sweep's wall time.

The space is a GPT's learning rate and width together, as a real sweep would search them (the
best lr shifts with the width). Also printed: how many trials ASHA let past each rung. Tune's
ASHA cuts at a percentile of the results a rung holds so far, so early in a sweep most trials
pass; that, more than the cuts, is where its steps go.

    .venv/bin/python benchmarks/sweep_efficiency.py [--trials 27] [--max-steps 81] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

from shipyard.runtime.local import start_local_ray
from shipyard.spec.job import JobSpec
from shipyard.spec.load import validate
from shipyard.sweep.history import by_trial, read_history
from shipyard.sweep.search_space import check_sweep
from shipyard.sweep.tuner import run_sweep, sweep_folder

WITHIN = 1.02
GRACE, REDUCTION = 9, 3  # ASHA's rungs: steps 9, 27, 81, ...
SPACE = {"train.lr": {"loguniform": [1.0e-5, 1.0e-2]}, "model.width": {"choice": [32, 64, 128]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=27)
    parser.add_argument("--max-steps", type=int, default=81)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start_local_ray(logging_level=logging.WARNING, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="shipyard-sweep-bench-")
    histories, wall = {}, {}
    for scheduler in ("fifo", "asha"):
        job = benchmark_job(scheduler, storage, args)
        started = time.perf_counter()
        run_sweep(job, check_sweep(job, "benchmark"), callbacks=[])
        wall[scheduler] = time.perf_counter() - started
        histories[scheduler] = read_history(sweep_folder(job))

    best = min(row["val_loss"] for rows in histories.values() for row in rows)
    target = best * WITHIN
    print(
        f"{args.trials} trials of up to {args.max_steps} steps over {SPACE}, seed {args.seed}; "
        f"best val_loss {best:.4f}, target <= {target:.4f}"
    )
    found = {}
    for scheduler, name in (("fifo", "random search"), ("asha", "ASHA")):
        found[scheduler] = steps_to_find(histories[scheduler], target)
        total = sum(steps_trained(histories[scheduler]))
        own_best = min(row["val_loss"] for row in histories[scheduler])
        print(
            f"{name:14s}: {found[scheduler]} steps to find it, {total} steps in all, "
            f"best {own_best:.4f}, wall {wall[scheduler]:.0f} s"
        )
    survival = rung_survival(histories["asha"], GRACE, REDUCTION, args.max_steps)
    print(f"ASHA trials that went on past each rung (it aims at 1 in {REDUCTION}): {survival}")
    if found["asha"] and found["fifo"]:
        print(f"ratio random/ASHA steps to find: {found['fifo'] / found['asha']:.2f}  (goal >= 3)")
    print(f"wall time ratio random/ASHA: {wall['fifo'] / wall['asha']:.2f}")


def benchmark_job(scheduler: str, storage: str, args) -> JobSpec:
    """A small GPT swept over SPACE; evaluated and checkpointed every 3 steps (ASHA's rungs
    fall on checkpoints)."""
    sweep = {
        "space": SPACE,
        "num_samples": args.trials,
        "seed": args.seed,
        "scheduler": scheduler,
    }
    if scheduler == "asha":
        sweep["asha"] = {"grace_period": GRACE, "reduction_factor": REDUCTION}
    document = {
        "name": f"bench-{scheduler}",
        "model": {"layers": 2, "heads": 2, "width": 64, "sequence_length": 64},
        "data": {"max_bytes": 1_000_000},
        "train": {
            "num_workers": 2,
            "cpus_per_worker": 0.45,
            "micro_batch_size": 8,
            "warmup_steps": 3,
            "max_steps": args.max_steps,
            "log_every": 3,
            "eval_every": 3,
            "checkpoint_every": 3,
            "keep_checkpoints": 1,
            "seed": args.seed,
        },
        "failure": {"max_failures": 0},
        "storage": storage,
        "sweep": sweep,
    }
    return validate(JobSpec, document, source="benchmark")


def steps_to_find(rows, target: float) -> int | None:
    """Steps trained by all trials, in report order, until one reports a loss <= target."""
    trained: dict[str, int] = {}
    for row in rows:
        trained[row["trial_id"]] = row["step"]
        if row["val_loss"] <= target:
            return sum(trained.values())
    return None


def steps_trained(rows) -> list[int]:
    """How far each trial trained."""
    return [max(row["step"] for row in own) for own in by_trial(rows).values()]


def rung_survival(rows, grace: int, reduction: int, max_steps: int) -> str:
    """At each ASHA rung, how many of the trials that reached it trained on past it."""
    trained = steps_trained(rows)
    rungs = [grace * reduction**k for k in range(max_steps) if grace * reduction**k < max_steps]
    return ", ".join(
        f"step {rung}: {sum(t > rung for t in trained)} of {sum(t >= rung for t in trained)}"
        for rung in rungs
    )


if __name__ == "__main__":
    main()
