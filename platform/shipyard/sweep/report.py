"""What a sweep shows and leaves behind: a live trial table, then results.csv, a plot of the
metric against step for every trial, and the best checkpoint's job as a ready-to-run spec."""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from rich.console import Console
from rich.live import Live
from rich.table import Table

from shipyard.console import output_console
from shipyard.errors import TrainingError
from shipyard.spec.job import JobSpec
from shipyard.storage import from_ray_storage, is_remote, local_mirror, open_store
from shipyard.sweep.history import by_trial, read_history
from shipyard.sweep.search_space import BEST_SUFFIX
from shipyard.sweep.trial import trial_of
from shipyard.train.checkpoint import read_checkpoint

RESULTS_FILE = "results.csv"
PLOT_FILE = "metric_by_step.png"
BEST_JOB_FILE = "best.yaml"


@dataclass(frozen=True)
class TrialRow:
    """One trial at the end of a sweep."""

    trial_id: str
    status: str  # completed, stopped early, error
    values: dict[str, Any]
    step: int
    metric: float  # the last reported value (nan if none)
    best_metric: float


@dataclass(frozen=True)
class SweepReport:
    """The sorted trials, the best checkpoint and the files written."""

    rows: list[TrialRow]
    best_trial: str
    best_metric: float
    best_checkpoint: str  # a folder, or s3://…
    best_job_file: Path
    results_file: Path
    plot_file: Path
    location: str  # where the files are kept: their folder, or the S3 prefix they were copied to


class TrialTable(tune.Callback):
    """Prints trial events as they happen and, on a terminal, keeps a live table of trials."""

    def __init__(self, metric: str, paths: list[str], max_steps: int):
        self.metric, self.paths, self.max_steps = metric, paths, max_steps
        self._console: Console | None = None
        self._live: Live | None = None
        self._drawn_at = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its callbacks with the experiment; consoles do not pickle.
        return {**self.__dict__, "_console": None, "_live": None}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        step = (trial.last_result or {}).get("step")
        if step:  # after a pause, a PBT exploit or an interrupted sweep; from a checkpoint
            self._say(f"trial {trial.trial_id} resumed (last reported step {step})")
        else:
            values = _format_values(trial.config, self.paths)
            self._say(f"trial {trial.trial_id} started: {values}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        origin = result.get("started_from_trial")
        restored = (
            f" (continues {origin}'s checkpoint)" if origin and origin != trial.trial_id else ""
        )
        self._say(
            f"trial {trial.trial_id} step {result.get('step')}: "
            f"{self.metric} {result.get(self.metric, math.nan):.4f}{restored}"
        )
        self._draw(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        step = (trial.last_result or {}).get("step", 0)
        how = "finished" if step >= self.max_steps else "stopped early by the scheduler"
        self._say(f"trial {trial.trial_id} {how} at step {step}")
        self._draw(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(f"trial {trial.trial_id} failed; its error is in {trial.local_path}")
        self._draw(trials, force=True)

    def on_step_end(self, iteration, trials, **info) -> None:
        self._draw(trials)

    def on_experiment_end(self, trials, **info) -> None:
        if self._live:
            self._live.stop()
            self._live = None

    def _say(self, line: str) -> None:
        self._get_console().print(line, highlight=False)

    def _draw(self, trials, force: bool = False) -> None:
        console = self._get_console()
        if not console.is_terminal or (not force and time.monotonic() - self._drawn_at < 1.0):
            return
        self._drawn_at = time.monotonic()
        if self._live is None:
            self._live = Live(console=console, auto_refresh=False, transient=True)
            self._live.start()
        self._live.update(self._table(trials), refresh=True)

    def _table(self, trials) -> Table:
        table = Table("trial", "state", *self.paths, "step", self.metric)
        for trial in trials:
            result = trial.last_result or {}
            table.add_row(
                trial.trial_id,
                trial.status,
                *(_format_value(trial.config.get(path)) for path in self.paths),
                str(result.get("step", "")),
                _format_value(result.get(self.metric)),
            )
        return table

    def _get_console(self) -> Console:
        if self._console is None:
            self._console = output_console()
        return self._console


def write_results(
    grid: tune.ResultGrid, job: JobSpec, paths: list[str], location: str
) -> SweepReport:
    """Rank the trials; write results.csv, the plot and best.yaml to the sweep's `location`
    (with S3: to its folder on this machine, then uploaded)."""
    metric, mode = job.sweep.metric, job.sweep.mode
    folder = local_mirror(location)
    folder.mkdir(parents=True, exist_ok=True)
    histories = by_trial(read_history(folder))
    rows = _ranked(
        [_trial_row(result, histories, metric, mode, paths, job) for result in grid], mode
    )
    checkpoint, best_metric = best_checkpoint(grid, metric, mode)
    _write_csv(folder / RESULTS_FILE, rows, paths, metric)
    plot_metric_by_step(histories, metric, folder / PLOT_FILE)
    best_trial = write_best_job(checkpoint, job, folder / BEST_JOB_FILE)
    if is_remote(location):
        store = open_store(location)
        for name in (RESULTS_FILE, PLOT_FILE, BEST_JOB_FILE):
            store.upload(folder / name, name)
    return SweepReport(
        rows,
        best_trial,
        best_metric,
        checkpoint,
        folder / BEST_JOB_FILE,
        folder / RESULTS_FILE,
        folder / PLOT_FILE,
        location,
    )


def best_checkpoint(grid: tune.ResultGrid, metric: str, mode: str) -> tuple[str, float]:
    """The kept checkpoint, of any trial, with the best reported metric."""
    sign = 1.0 if mode == "min" else -1.0
    candidates = [
        (sign * metrics[metric], from_ray_storage(checkpoint.path, checkpoint.filesystem))
        for result in grid
        for checkpoint, metrics in (result.best_checkpoints or [])
        if metric in metrics and math.isfinite(metrics[metric])
    ]
    if not candidates:
        failed = [str(result.path) for result in grid if result.error is not None]
        raise TrainingError(
            f"no trial of the sweep reported a checkpoint with {metric}; "
            f"{len(failed)} of {len(grid)} trials failed (their errors are in "
            f"{', '.join(failed) or 'no folder'}). To fix: run one trial's job with "
            "`shipyard train` to see why it fails."
        )
    score, path = min(candidates)
    return path, sign * score


def write_best_job(checkpoint: str, job: JobSpec, destination: Path) -> str:
    """The job that produced `checkpoint`, renamed `<job>-best`, as YAML; returns its trial."""
    saved = read_checkpoint(checkpoint)
    trial = trial_of(saved)
    best = {**saved.job, "name": f"{job.name}{BEST_SUFFIX}", "storage": job.storage}
    best.pop("sweep", None)
    JobSpec.model_validate(best)  # what we write must load
    header = (
        f"# The best configuration of sweep {job.name!r} (trial {trial}), as a job spec.\n"
        f"# Its checkpoint: {checkpoint}\n"
    )
    destination.write_text(header + yaml.safe_dump(best, sort_keys=False))
    return trial


def plot_metric_by_step(
    histories: dict[str, list[dict[str, Any]]], metric: str, destination: Path
) -> None:
    """One line per trial: the metric against the optimizer step, in the order reported."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and no global pyplot state
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    axes = figure.subplots()
    for trial_id, history in histories.items():
        points = [row for row in history if metric in row and "step" in row]
        if points:
            steps, values = [row["step"] for row in points], [row[metric] for row in points]
            axes.plot(steps, values, marker=".", label=trial_id)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} by step, every trial")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(destination)


def results_table(report: SweepReport, paths: list[str], metric: str) -> Table:
    """The ranked trials, for the terminal."""
    table = Table("rank", "trial", "status", *paths, "step", metric, f"best {metric}")
    for rank, row in enumerate(report.rows, start=1):
        table.add_row(
            str(rank),
            row.trial_id,
            row.status,
            *(_format_value(row.values.get(path)) for path in paths),
            str(row.step),
            _format_value(row.metric),
            _format_value(row.best_metric),
        )
    return table


def _trial_row(result, histories, metric: str, mode: str, paths: list[str], job) -> TrialRow:
    trial_id = result.metrics.get("trial_id", Path(result.path).name)
    history = histories.get(trial_id, [])
    values = [row[metric] for row in history if math.isfinite(row.get(metric, math.nan))]
    best = (min if mode == "min" else max)(values) if values else math.nan
    step = int(result.metrics.get("step", 0))
    if result.error is not None:
        status = "error"
    elif step >= job.train.max_steps:
        status = "completed"
    else:
        status = "stopped early"
    return TrialRow(
        trial_id=trial_id,
        status=status,
        values={path: result.config.get(path) for path in paths},
        step=step,
        metric=float(result.metrics.get(metric, math.nan)),
        best_metric=best,
    )


def _ranked(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    sign = 1.0 if mode == "min" else -1.0

    def key(row: TrialRow) -> tuple[bool, float]:
        missing = row.status == "error" or not math.isfinite(row.metric)
        return missing, sign * row.metric if not missing else 0.0

    return sorted(rows, key=key)


def _write_csv(destination: Path, rows: list[TrialRow], paths: list[str], metric: str) -> None:
    with destination.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["rank", "trial_id", "status", *paths, "step", metric, f"best_{metric}"])
        for rank, row in enumerate(rows, start=1):
            values = [row.values.get(path) for path in paths]
            writer.writerow(
                [rank, row.trial_id, row.status, *values, row.step, row.metric, row.best_metric]
            )


def _format_values(config: dict[str, Any], paths: list[str]) -> str:
    return ", ".join(f"{path}={_format_value(config.get(path))}" for path in paths)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
