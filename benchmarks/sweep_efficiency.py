"""Training steps ASHA and random search spend to find a config within 2% of the best loss.

All sweeps draw the same configs (one search space, one seed). Random search trains every
trial to the end; ASHA stops the weak ones at its rungs. For each, walk the trials' reports in
time order and count the steps trained by all trials until some trial first reports a
validation loss within 2% of the best any sweep found. Prints the counts, their ratios (goal:
ASHA needs at least 3x fewer) and each sweep's wall time (goal: ASHA's at least 2.5x shorter),
and how long a trial takes to start, phase by phase (goal: 5 s or less).

ASHA runs with each promotion rule asked for: `pause` (the default), Li et al.'s, where trials
pause at each rung and only the top 1/3 of all its results resume; and `percentile`, Tune's
ASHAScheduler, which cuts at a percentile of the results a rung holds so far, so a rung's
early arrivals go on. Also printed: how many trials each let past each rung.

The space is a GPT's learning rate and width together, as a real sweep would search them (the
best lr shifts with the width). Trials train up to 243 steps, so the rungs at 9, 27 and 81
steps make the three-rung bracket ASHA is usually run with; with --max-steps 81 there are two,
and even an ASHA that never promoted a weak trial would save at most 3.9x.

    .venv/bin/python benchmarks/sweep_efficiency.py [--trials 27] [--max-steps 243] [--seed 0]
        [--promotion pause percentile]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

from shipyard.runtime.local import start_local_ray
from shipyard.spec.job import JobSpec
from shipyard.spec.load import validate
from shipyard.sweep.history import by_trial, read_history
from shipyard.sweep.promotion import Rungs
from shipyard.sweep.search_space import check_sweep
from shipyard.sweep.tuner import run_sweep, sweep_folder
from shipyard.train.trainer import START_PARTS

WITHIN = 1.02
GRACE, REDUCTION = 9, 3  # ASHA's rungs: steps 9, 27, 81, ...
CHECKPOINT_EVERY = 3  # also evaluated then: ASHA's rungs fall on checkpoints
SPACE = {"train.lr": {"loguniform": [1.0e-5, 1.0e-2]}, "model.width": {"choice": [32, 64, 128]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=27)
    parser.add_argument("--max-steps", type=int, default=243)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--promotion", nargs="+", choices=["pause", "percentile"], default=["pause"]
    )
    args = parser.parse_args()

    start_local_ray(logging_level=logging.WARNING, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="shipyard-sweep-bench-")
    sweeps = ["random", *(f"asha-{promotion}" for promotion in args.promotion)]
    histories, wall = {}, {}
    for name in sweeps:
        job = benchmark_job(name, storage, args)
        started = time.perf_counter()
        run_sweep(job, check_sweep(job, "benchmark"), callbacks=[])
        wall[name] = time.perf_counter() - started
        histories[name] = read_history(sweep_folder(job))

    best = min(row["val_loss"] for rows in histories.values() for row in rows)
    target = best * WITHIN
    print(
        f"{args.trials} trials of up to {args.max_steps} steps over {SPACE}, seed {args.seed}; "
        f"best val_loss {best:.4f}, target <= {target:.4f}"
    )
    found = {}
    for name in sweeps:
        found[name] = steps_to_find(histories[name], target)
        total = sum(steps_trained(histories[name]))
        own_best = min(row["val_loss"] for row in histories[name])
        print(
            f"{name:15s}: {found[name]} steps to find it, {total} steps in all, "
            f"best {own_best:.4f}, wall {wall[name]:.0f} s"
        )
    for name in sweeps:
        print(f"{name}: {start_breakdown(histories[name])}")
    rungs = Rungs.between(GRACE, REDUCTION, args.max_steps, CHECKPOINT_EVERY).milestones
    for name in sweeps[1:]:
        survival = rung_survival(histories[name], rungs)
        print(f"{name}: trials that went on past each rung (aim: 1 in {REDUCTION}): {survival}")
        if found[name] and found["random"]:
            ratio = found["random"] / found[name]
            print(f"{name}: ratio random/ASHA steps to find: {ratio:.2f}  (goal >= 3)")
        print(f"{name}: wall time ratio random/ASHA: {wall['random'] / wall[name]:.2f}")


def benchmark_job(name: str, storage: str, args) -> JobSpec:
    """A small GPT swept over SPACE by `name` (random, asha-percentile or asha-pause);
    evaluated and checkpointed every 3 steps (ASHA's rungs fall on checkpoints)."""
    scheduler, _, promotion = name.partition("-")
    sweep = {
        "space": SPACE,
        "num_samples": args.trials,
        "seed": args.seed,
        "scheduler": "fifo" if scheduler == "random" else scheduler,
    }
    if promotion:
        sweep["asha"] = {
            "grace_period": GRACE,
            "reduction_factor": REDUCTION,
            "promotion": promotion,
        }
    document = {
        "name": f"bench-{name}",
        "model": {"layers": 2, "heads": 2, "width": 64, "sequence_length": 64},
        "data": {"max_bytes": 1_000_000},
        "train": {
            "num_workers": 2,
            "cpus_per_worker": 0.45,
            "micro_batch_size": 8,
            "warmup_steps": 3,
            "max_steps": args.max_steps,
            "log_every": 3,
            "eval_every": CHECKPOINT_EVERY,
            "checkpoint_every": CHECKPOINT_EVERY,
            "keep_checkpoints": 1,
            "seed": args.seed,
        },
        "failure": {"max_failures": 0},
        "storage": storage,
        "sweep": sweep,
    }
    return validate(JobSpec, document, source="benchmark")


def start_breakdown(rows) -> str:
    """The median start of the sweep's trials (each trial's, and each restart's: an ASHA
    promotion or a PBT exploit), phase by phase: Tune's call to the trial's run (`trial`),
    then the run's own (see shipyard.train.worker)."""
    starts = [row for row in rows if "start_s" in row]
    if not starts:
        return "no run reported its start"
    phases = ", ".join(
        f"{part} {statistics.median(row[f'start_{part}_s'] for row in starts):.2f}"
        for part in ("trial", *START_PARTS)
    )
    total = statistics.median(row["start_trial_s"] + row["start_s"] for row in starts)
    slowest = max(row["start_trial_s"] + row["start_s"] for row in starts)
    return (
        f"{len(starts)} trial starts, median {total:.2f} s (goal <= 5), slowest {slowest:.1f} s"
        f" (a new gang's first run): {phases}"
    )


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


def rung_survival(rows, rungs: list[int]) -> str:
    """At each ASHA rung (a step), how many of the trials that reached it trained on past it."""
    trained = steps_trained(rows)
    return ", ".join(
        f"step {rung}: {sum(t > rung for t in trained)} of {sum(t >= rung for t in trained)}"
        for rung in rungs
    )


if __name__ == "__main__":
    main()
