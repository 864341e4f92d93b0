"""Experiment tracking: every run's params, metrics and tags in MLflow and TensorBoard.

The driver records, not a rank: every metric row already reaches it (for metrics.jsonl and the
progress bar), so the workers need no tracking client and a restarted worker group changes
nothing here. `RunTracking` takes each row once, by step: a row whose step was already recorded
(a worker group restarted from an earlier checkpoint trains those steps again) is skipped, and
a new invocation of the same job starts after the last step its record holds. The record of a
run, `tracking.json` beside its checkpoints (S3 included), keeps the MLflow run's id, so a
stopped, restarted or moved run continues its own MLflow run.

Trackers write on a thread of their own: a slow or dead tracking server never holds up the
metrics. A tracker that fails is reported once, as a warning, and left out from then on; the
metrics stay in metrics.jsonl.
"""
