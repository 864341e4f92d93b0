"""What every generator shares: a request, how the next token is chosen, a broken-model check."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shipyard.spec.model import BYTE_VOCABULARY


class BrokenModelError(RuntimeError):
    """The model produced non-finite logits: its weights are corrupt."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, already tokenized, and how to continue it (temperature 0 is greedy; top_k
    and top_p keep the most likely tokens, by count and by cumulative probability)."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    top_p: float = 1.0


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
    """The next token: argmax at temperature 0, else a seeded sample (optionally top-k and
    top-p). Only the tokenizer's `vocabulary` ids are candidates (a model's vocabulary may be
    padded)."""
    logits = logits[:vocabulary].double().cpu()
    if request.temperature == 0:
        return int(torch.argmax(logits))
    # Shifted so the best logit is 0 before dividing: at any positive temperature, however
    # small, every value stays in [-inf, 0] and the softmax never sees inf - inf.
    scaled = (logits - logits.max()) / request.temperature
    if request.top_k is not None and request.top_k < scaled.numel():
        threshold = torch.topk(scaled, request.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probabilities = torch.softmax(scaled, dim=0)
    if request.top_p < 1.0:
        probabilities = nucleus(probabilities, request.top_p)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def nucleus(probabilities: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose probabilities reach `top_p` (the most
    likely one always kept), the rest zeroed."""
    ordered, order = torch.sort(probabilities, descending=True)
    before = torch.cumsum(ordered, dim=0) - ordered  # the mass of the tokens ranked above
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probabilities).scatter(0, order, ordered)


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
