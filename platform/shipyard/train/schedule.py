"""Learning-rate schedule: linear warmup, then cosine, linear or constant down to a floor."""

from __future__ import annotations

import math

from shipyard.spec.job import TrainSpec


def lr_factor(step: int, train: TrainSpec) -> float:
    """Multiplier on `train.lr` for optimizer step `step` (0-based)."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    decay_steps = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    if train.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * shape
