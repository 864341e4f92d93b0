"""Model factories the tests name in `model.factory` (the contract is in docs/models.md)."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """A pre-norm MLP block with a causal token mix: hidden states in and out."""

    def __init__(self, width: int, sequence_length: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(sequence_length, sequence_length)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        mask = torch.tril(torch.ones(sequence_length, sequence_length, dtype=torch.bool))
        self.register_buffer("causal", mask, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        weight = self.mix.weight[:length, :length].masked_fill(~self.causal[:length, :length], 0)
        mixed = torch.einsum("ts,bsh->bth", weight, self.norm(hidden))
        return hidden + self.mlp(mixed)


class Embed(nn.Module):
    def __init__(self, vocabulary_size: int, width: int):
        super().__init__()
        self.tokens = nn.Embedding(vocabulary_size, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokens(tokens)


def mixer(vocabulary_size: int, sequence_length: int, width: int = 32, blocks: int = 2):
    """An nn.Sequential (input piece, blocks, output piece): every layout a factory may use."""
    return nn.Sequential(
        Embed(vocabulary_size, width),
        *[Residual(width, sequence_length) for _ in range(blocks)],
        nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocabulary_size)),
    )


class Bigram(nn.Module):
    """Not a Sequential: trains whole (data parallel and ZeRO)."""

    def __init__(self, vocabulary_size: int):
        super().__init__()
        self.table = nn.Embedding(vocabulary_size, vocabulary_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)


def bigram(vocabulary_size: int, sequence_length: int):
    return Bigram(vocabulary_size)


def small_vocabulary(vocabulary_size: int, sequence_length: int):
    """Ignores the vocabulary it is given: its logits have the wrong width."""
    return Bigram(100)


def not_a_module(vocabulary_size: int, sequence_length: int):
    return "a string"
