"""Text generation with any causal language model: a Hugging Face model with its own KV cache,
or a module without one (your factory's), which recomputes the whole prefix for every token.

Each sequence runs alone, its prompt prefilled alone and every decode step on its own cache,
so a request's tokens never depend on what else shares the batch. The batcher still interleaves
sequences step by step; what they do not share is the matmuls (the built-in GPT's generator,
models/gpt/generation.py, batches those without losing that guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shipyard.models import sampling
from shipyard.models.family import logits_of
from shipyard.models.sampling import (
    GenerationRequest,
    check_fits,
    choose,
    finite,
    run_to_completion,
)
from shipyard.spec.model import BYTE_VOCABULARY


@dataclass
class Sequence(sampling.Sequence):
    """A request in flight with the model's own KV cache (None before the prefill, or for a
    model without one)."""

    cache: Any = None


class CausalLMGenerator:
    """Greedy or sampled continuation of byte-level prompts with a causal LM."""

    def __init__(
        self,
        model: nn.Module,
        context_length: int,
        uses_cache: bool,
        end_of_sequence: int | None = None,
        vocabulary: int = BYTE_VOCABULARY,
    ):
        self.model = model.eval()
        self.context_length = context_length
        self.uses_cache = uses_cache
        self.end_of_sequence = end_of_sequence
        self.vocabulary = vocabulary
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[list[int]]:
        """The new tokens for every request."""
        return run_to_completion(self, requests)

    @torch.inference_mode()
    def start(self, request: GenerationRequest) -> Sequence:
        """Prefill the prompt and choose the first new token."""
        check_fits(request, self.context_length)
        sequence = Sequence(request, torch.Generator(device="cpu").manual_seed(request.seed))
        tokens = torch.tensor([request.prompt], device=self.device)
        self._append(sequence, self._forward(sequence, tokens))
        return sequence

    @torch.inference_mode()
    def step(self, sequences: list[Sequence]) -> None:
        """One more token for each unfinished sequence, each computed alone."""
        for sequence in sequences:
            if self.uses_cache:
                tokens = torch.tensor([[sequence.produced[-1]]], device=self.device)
            else:
                tokens = torch.tensor([[*sequence.request.prompt, *sequence.produced]])
            self._append(sequence, self._forward(sequence, tokens.to(self.device)))

    def check(self) -> None:
        """Raise BrokenModelError unless a fixed probe prompt gives finite logits."""
        probe = GenerationRequest(prompt=tuple(b"health"), max_new_tokens=1)
        with torch.inference_mode():
            self.start(probe)

    def _forward(self, sequence: Sequence, tokens: torch.Tensor) -> torch.Tensor:
        """The logits of the last position, keeping the model's cache in the sequence."""
        if not self.uses_cache:
            return finite(logits_of(self.model(tokens))[0, -1])
        output = self.model(input_ids=tokens, cache=sequence.cache, use_cache=True)
        sequence.cache = output.cache
        return finite(output.logits[0, -1])

    def _append(self, sequence: Sequence, logits: torch.Tensor) -> None:
        token = choose(logits, sequence.request, sequence.generator, self.vocabulary)
        sequence.accept(token, self.end_of_sequence)
