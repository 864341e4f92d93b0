"""What every generator shares: a request, how the next token is chosen, a broken-model check."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shipyard.spec.model import BYTE_VOCABULARY


class BrokenModelError(RuntimeError):
    """The model produced non-finite logits: its weights are corrupt."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, already tokenized, and how to continue it (temperature 0 is greedy)."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0


def finite(logits: torch.Tensor) -> torch.Tensor:
    """`logits`, or BrokenModelError if any is NaN or infinite."""
    if not torch.isfinite(logits).all():
        raise BrokenModelError("the model produced non-finite logits; its weights are corrupt")
    return logits


def choose(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator) -> int:
    """The next token: argmax at temperature 0, else a seeded sample (optionally top-k). Only
    tokens the byte tokenizer can decode are candidates."""
    logits = logits[:BYTE_VOCABULARY].float().cpu()
    if request.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / request.temperature
    if request.top_k is not None and request.top_k < logits.numel():
        threshold = torch.topk(logits, request.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probabilities = torch.softmax(logits, dim=0)
    return int(torch.multinomial(probabilities, 1, generator=generator))
