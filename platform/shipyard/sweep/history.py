"""Every result a sweep's trials report, in the order the driver saw them.

Tune's own per-trial result files are not a reliable history: when a trial restarts from a
checkpoint (a PBT exploit, a resume) Tune copies the trial's files back from storage, which it
syncs only every few minutes, so the rows reported in between are lost. The driver therefore
appends each result to one JSON-lines file of its own, `history.jsonl` in the sweep folder
(with S3 storage, in its mirror on this machine, uploaded when the sweep stops).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import tune

from shipyard.storage import local_mirror

HISTORY_FILE = "history.jsonl"


class TrialHistory(tune.Callback):
    """Appends each trial result (its scalars and the swept values) to `history.jsonl`."""

    def __init__(self, location: str, paths: list[str]):
        # Tune pickles its callbacks with the sweep: a resume on another machine (or with
        # another SHIPYARD_CACHE) must find the file where that machine mirrors the location.
        self.location = location
        self.paths = paths

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        row = {key: value for key, value in result.items() if _is_scalar(value)}
        row["trial_id"] = trial.trial_id
        # The values of the run that reported: a PBT exploit may already have changed trial.config.
        config = result.get("config", trial.config)
        row["config"] = {path: config.get(path) for path in self.paths}
        path = local_mirror(self.location) / HISTORY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as file:
            file.write(json.dumps(row) + "\n")


def read_history(folder: Path) -> list[dict[str, Any]]:
    """Every trial's results, in the order the driver received them (empty if none yet)."""
    path = Path(folder) / HISTORY_FILE
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a driver killed mid-write leaves a partial last line
            continue
    return rows


def by_trial(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """`rows` grouped by trial, each trial's in their original order."""
    histories: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        histories.setdefault(row["trial_id"], []).append(row)
    return histories


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
