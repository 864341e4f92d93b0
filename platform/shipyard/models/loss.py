"""The training loss every family shares: next-token cross-entropy over logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shipyard.models.tensor_parallel import SINGLE, TensorParallel, parallel_cross_entropy


def language_model_loss(
    logits: torch.Tensor, targets: torch.Tensor, tp: TensorParallel = SINGLE
) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the training precision. Under
    tensor parallelism `logits` hold this rank's share of the vocabulary; they are never
    gathered."""
    if tp.active:
        return parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), tp)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
