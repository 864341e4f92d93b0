"""Text generation with a KV cache for `models.gpt.GPT`, batch-invariant by construction.

A request served in a batch must get exactly the tokens it would get alone. Dense matmuls on CPU
pick different kernels for different numbers of rows, which changes the last bits of every row
and can flip a greedy choice. So everything that mixes rows works one sequence at a time: the
prompt is prefilled alone, attention reads each sequence's own cache, and the per-token linear
layers are batched matmuls whose every batch entry is computed on its own (same kernel, same
bits, whatever the batch size). Only the weights' memory traffic and Python overhead are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from shipyard.models import sampling
from shipyard.models.gpt.model import GPT, Block, Embedding, Head
from shipyard.models.sampling import (
    GenerationRequest,
    check_fits,
    choose,
    finite,
    run_to_completion,
)
from shipyard.models.tensor_parallel import LINEAR_LAYERS
from shipyard.spec.model import BYTE_VOCABULARY


@dataclass
class Sequence(sampling.Sequence):
    """A request in flight with its own KV cache (the GPT has no end token: it runs to
    max_new_tokens)."""

    # Per block: keys and values, (2, heads, context, head_width).
    caches: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # tokens in the cache


class TextGenerator:
    """Greedy or sampled continuation of tokenized prompts with a trained GPT; it stops at the
    tokenizer's end-of-text token, if it has one."""

    def __init__(
        self,
        model: GPT,
        context_length: int,
        vocabulary: int = BYTE_VOCABULARY,
        end_of_sequence: int | None = None,
    ):
        self.model = model.eval()
        self.context_length = context_length
        self.vocabulary = vocabulary
        self.end_of_sequence = end_of_sequence
        self.embedding: Embedding = model.layers[0]
        self.blocks: list[Block] = list(model.layers[1:-1])
        self.head: Head = model.layers[-1]
        self.device = next(model.parameters()).device
        # Transposed, contiguous copies once, so each decode step only expands them (no copy).
        self._transposed = {
            linear: linear.weight.detach().t().contiguous()
            for linear in model.modules()
            if isinstance(linear, LINEAR_LAYERS)
        }

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[list[int]]:
        """The new tokens for every request, each exactly as if it had been generated alone."""
        return run_to_completion(self, requests)

    @torch.inference_mode()
    def start(self, request: GenerationRequest) -> Sequence:
        """Prefill the request's prompt alone and choose its first new token."""
        sequence = self._allocate(request)
        sequence.accept(self._choose(self._prefill(sequence), sequence), self.end_of_sequence)
        return sequence

    @torch.inference_mode()
    def step(self, sequences: list[Sequence]) -> None:
        """One more token for each unfinished sequence. Sequences may join or leave between
        steps: a row's result never depends on which other rows share the step."""
        logits = self._decode(sequences)
        # argmax takes the first maximum of each row, alone or batched: one call for all rows.
        greedy = logits[:, : self.vocabulary].argmax(dim=1).tolist()
        for sequence, row, best in zip(sequences, logits, greedy, strict=True):
            sampled = sequence.request.temperature > 0
            token = self._choose(row, sequence) if sampled else best
            sequence.accept(token, self.end_of_sequence)

    def check(self) -> None:
        """Raise BrokenModelError unless a fixed probe prompt gives finite logits."""
        probe = GenerationRequest(prompt=tuple(b"health"), max_new_tokens=1)
        with torch.inference_mode():
            self._prefill(self._allocate(probe))

    def _allocate(self, request: GenerationRequest) -> Sequence:
        check_fits(request, self.context_length)
        shape = (2, self.blocks[0].heads, self.context_length, self.blocks[0].head_width)
        return Sequence(
            request=request,
            generator=torch.Generator(device="cpu").manual_seed(request.seed),
            caches=[torch.empty(shape, device=self.device) for _ in self.blocks],
        )

    def _prefill(self, sequence: Sequence) -> torch.Tensor:
        """Run the prompt through the model alone, filling its cache; the last position's logits."""
        tokens = torch.tensor([sequence.request.prompt], device=self.device)
        hidden = self.embedding(tokens)  # (1, length, width)
        length = tokens.shape[1]
        for index, block in enumerate(self.blocks):
            query, key, value = _split_heads(block, block.qkv(block.attention_norm(hidden)))
            sequence.caches[index][0, :, :length] = key[0]
            sequence.caches[index][1, :, :length] = value[0]
            attended = F.scaled_dot_product_attention(query, key, value, is_causal=True)
            hidden = hidden + block.attention_out(_merge_heads(attended))
            hidden = hidden + block.mlp_out(F.gelu(block.mlp_in(block.mlp_norm(hidden))))
        sequence.length = length
        return _finite(self.head(hidden)[0, -1])

    def _decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """The logits of each sequence's next position, one row per sequence."""
        last = torch.tensor([sequence.produced[-1] for sequence in sequences], device=self.device)
        positions = torch.tensor([sequence.length for sequence in sequences], device=self.device)
        hidden = self.embedding.tokens(last) + self.embedding.positions(positions)  # (rows, width)
        for index, block in enumerate(self.blocks):
            qkv = self._linear(block.qkv, block.attention_norm(hidden))
            attended = [
                self._attend_one(block, index, sequence, row)
                for sequence, row in zip(sequences, qkv, strict=True)
            ]
            hidden = hidden + self._linear(block.attention_out, torch.stack(attended))
            inner = F.gelu(self._linear(block.mlp_in, block.mlp_norm(hidden)))
            hidden = hidden + self._linear(block.mlp_out, inner)
        for sequence in sequences:
            sequence.length += 1
        logits = self._linear(self.head.logits, self.head.norm(hidden))
        return _finite(logits)

    def _attend_one(
        self, block: Block, index: int, sequence: Sequence, qkv: torch.Tensor
    ) -> torch.Tensor:
        """Attention of one sequence's new token over its own cache (heads flattened back)."""
        heads = qkv.view(3, block.heads, -1)  # query, key, value: (heads, head_width) each
        cache = sequence.caches[index]
        cache[:, :, sequence.length] = heads[1:]  # key and value in one write
        cached = cache[:, None, :, : sequence.length + 1]  # (2, 1, heads, length, head_width)
        attended = F.scaled_dot_product_attention(heads[0, None, :, None], cached[0], cached[1])
        return attended.view(-1)

    def _choose(self, logits: torch.Tensor, sequence: Sequence) -> int:
        return choose(logits, sequence.request, sequence.generator, self.vocabulary)

    def _linear(self, linear: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
        """`linear(rows)` computed row by row in one batched matmul (see the module docstring)."""
        count = rows.shape[0]
        weight = self._transposed[linear].expand(count, -1, -1)
        rows = rows.unsqueeze(1)
        if linear.bias is None:
            return torch.bmm(rows, weight).squeeze(1)
        bias = linear.bias.view(1, 1, -1).expand(count, 1, -1)
        return torch.baddbmm(bias, rows, weight).squeeze(1)


def _split_heads(
    block: Block, qkv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, length, triple = qkv.shape
    width = triple // 3
    return tuple(
        part.view(batch, length, block.heads, width // block.heads).transpose(1, 2)
        for part in qkv.split(width, dim=2)
    )


def _merge_heads(attended: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_width = attended.shape
    return attended.transpose(1, 2).reshape(batch, length, heads * head_width)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    return finite(logits)
