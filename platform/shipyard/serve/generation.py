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

from shipyard.models.gpt import GPT, Block, Embedding, Head
from shipyard.spec.job import BYTE_VOCABULARY


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
class _Sequence:
    """A request in flight: its sampler, its cache and what it has produced so far."""

    request: GenerationRequest
    generator: torch.Generator
    keys: list[torch.Tensor]  # per block: (heads, context, head_width)
    values: list[torch.Tensor]
    length: int = 0  # tokens in the cache
    produced: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.produced) >= self.request.max_new_tokens


class TextGenerator:
    """Greedy or sampled continuation of byte-level prompts with a trained GPT."""

    def __init__(self, model: GPT, context_length: int):
        self.model = model.eval()
        self.context_length = context_length
        self.embedding: Embedding = model.layers[0]
        self.blocks: list[Block] = list(model.layers[1:-1])
        self.head: Head = model.layers[-1]
        self.device = next(model.parameters()).device
        # Transposed, contiguous copies once, so each decode step only expands them (no copy).
        self._transposed = {
            linear: linear.weight.detach().t().contiguous()
            for linear in model.modules()
            if isinstance(linear, nn.Linear)
        }

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[list[int]]:
        """The new tokens for every request, each exactly as if it had been generated alone."""
        sequences = [self._start(request) for request in requests]
        logits = [self._prefill(sequence) for sequence in sequences]
        active = list(range(len(sequences)))
        while True:
            for index, row in zip(active, logits, strict=True):
                sequences[index].produced.append(_choose(row, sequences[index]))
            active = [index for index in active if not sequences[index].done]
            if not active:
                return [sequence.produced for sequence in sequences]
            logits = self._decode([sequences[index] for index in active])

    def check(self) -> None:
        """Raise BrokenModelError unless a fixed probe prompt gives finite logits."""
        probe = GenerationRequest(prompt=tuple(b"health"), max_new_tokens=1)
        with torch.inference_mode():
            self._prefill(self._start(probe))

    def _start(self, request: GenerationRequest) -> _Sequence:
        if len(request.prompt) + request.max_new_tokens > self.context_length:
            raise ValueError(
                f"{len(request.prompt)} prompt tokens + {request.max_new_tokens} new tokens exceed "
                f"the context length {self.context_length}"
            )
        shape = (self.blocks[0].heads, self.context_length, self._head_width)
        return _Sequence(
            request=request,
            generator=torch.Generator(device="cpu").manual_seed(request.seed),
            keys=[torch.empty(shape, device=self.device) for _ in self.blocks],
            values=[torch.empty(shape, device=self.device) for _ in self.blocks],
        )

    @property
    def _head_width(self) -> int:
        return self.embedding.tokens.embedding_dim // self.blocks[0].heads

    def _prefill(self, sequence: _Sequence) -> torch.Tensor:
        """Run the prompt through the model alone, filling its cache; the last position's logits."""
        tokens = torch.tensor([sequence.request.prompt], device=self.device)
        hidden = self.embedding(tokens)  # (1, length, width)
        length = tokens.shape[1]
        for index, block in enumerate(self.blocks):
            query, key, value = _split_heads(block, block.qkv(block.attention_norm(hidden)))
            sequence.keys[index][:, :length] = key[0]
            sequence.values[index][:, :length] = value[0]
            attended = F.scaled_dot_product_attention(query, key, value, is_causal=True)
            hidden = hidden + block.attention_out(_merge_heads(attended))
            hidden = hidden + block.mlp_out(F.gelu(block.mlp_in(block.mlp_norm(hidden))))
        sequence.length = length
        return _finite(self.head(hidden)[0, -1])

    def _decode(self, sequences: list[_Sequence]) -> list[torch.Tensor]:
        """One new token for each sequence: the logits of the next position, one row each."""
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
        return [_finite(row) for row in logits]

    def _attend_one(
        self, block: Block, index: int, sequence: _Sequence, qkv: torch.Tensor
    ) -> torch.Tensor:
        """Attention of one sequence's new token over its own cache (heads flattened back)."""
        query, key, value = _split_heads(block, qkv.view(1, 1, -1))
        position = sequence.length
        sequence.keys[index][:, position] = key[0, :, 0]
        sequence.values[index][:, position] = value[0, :, 0]
        cached = slice(0, position + 1)
        attended = F.scaled_dot_product_attention(
            query, sequence.keys[index][None, :, cached], sequence.values[index][None, :, cached]
        )
        return _merge_heads(attended)[0, 0]

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
    if not torch.isfinite(logits).all():
        raise BrokenModelError("the model produced non-finite logits; its weights are corrupt")
    return logits


def _choose(logits: torch.Tensor, sequence: _Sequence) -> int:
    """The next token: argmax at temperature 0, else a seeded sample (optionally top-k)."""
    request = sequence.request
    logits = logits[:BYTE_VOCABULARY].float().cpu()  # the tokenizer only knows bytes
    if request.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / request.temperature
    if request.top_k is not None and request.top_k < logits.numel():
        threshold = torch.topk(logits, request.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probabilities = torch.softmax(logits, dim=0)
    return int(torch.multinomial(probabilities, 1, generator=sequence.generator))
