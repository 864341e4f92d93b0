"""What every generator shares: a request, how the next token is chosen, a broken-model check."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class Sequence:
    """A request in flight: its seeded sampler and the tokens it produced so far (each
    generator adds its own cache)."""

    request: GenerationRequest
    generator: torch.Generator
    produced: list[int] = field(default_factory=list)
    stopped: bool = False  # it produced the model's end-of-sequence token

    @property
    def done(self) -> bool:
        """True once it stopped, or has all the new tokens it asked for."""
        return self.stopped or len(self.produced) >= self.request.max_new_tokens

    def accept(self, token: int, end_of_sequence: int | None) -> None:
        """Keep the token, or stop at the end token (which is not part of the answer)."""
        if token == end_of_sequence:
            self.stopped = True
        else:
            self.produced.append(token)


def finite(logits: torch.Tensor) -> torch.Tensor:
    """`logits`, or BrokenModelError if any is NaN or infinite."""
    if not torch.isfinite(logits).all():
        raise BrokenModelError("the model produced non-finite logits; its weights are corrupt")
    return logits


def choose(
    logits: torch.Tensor,
    request: GenerationRequest,
    generator: torch.Generator,
    vocabulary: int = BYTE_VOCABULARY,
) -> int:
    """The next token: argmax at temperature 0, else a seeded sample (optionally top-k). Only
    the tokenizer's `vocabulary` ids are candidates (a model's vocabulary may be padded)."""
    logits = logits[:vocabulary].float().cpu()
    if request.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / request.temperature
    if request.top_k is not None and request.top_k < logits.numel():
        threshold = torch.topk(logits, request.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probabilities = torch.softmax(logits, dim=0)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def check_fits(request: GenerationRequest, context_length: int) -> None:
    """ValueError unless the prompt and the new tokens fit the model's context."""
    if len(request.prompt) + request.max_new_tokens > context_length:
        raise ValueError(
            f"{len(request.prompt)} prompt tokens + {request.max_new_tokens} new tokens exceed "
            f"the context length {context_length}"
        )


def run_to_completion(generator, requests: list[GenerationRequest]) -> list[list[int]]:
    """Every request's new tokens: each started, then all stepped together until done."""
    sequences = [generator.start(request) for request in requests]
    while active := [sequence for sequence in sequences if not sequence.done]:
        generator.step(active)
    return [sequence.produced for sequence in sequences]
