"""A small GPT built from `ModelSpec`, as a list of layers so DeepSpeed can pipeline it.

Each layer initialises its own weights from `(seed, layer index)`, so the same spec and seed give
the same model whether it is built whole, split into pipeline stages, or sharded by ZeRO-3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shipyard.spec.job import ModelSpec

INIT_STD = 0.02


class Embedding(nn.Module):
    """Token and learned position embeddings: token ids (batch, seq) → hidden (batch, seq, width)."""

    def __init__(self, spec: ModelSpec, seed: int):
        super().__init__()
        self.tokens = nn.Embedding(spec.vocabulary_size, spec.width)
        self.positions = nn.Embedding(spec.sequence_length, spec.width)
        self.dropout = nn.Dropout(spec.dropout)
        _initialise(self, seed, residual_std=INIT_STD)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.dropout(self.tokens(tokens) + self.positions(positions))


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP, each with a residual."""

    def __init__(self, spec: ModelSpec, seed: int):
        super().__init__()
        self.heads = spec.heads
        self.dropout = spec.dropout
        self.attention_norm = nn.LayerNorm(spec.width)
        self.qkv = nn.Linear(spec.width, 3 * spec.width)
        self.attention_out = nn.Linear(spec.width, spec.width)
        self.mlp_norm = nn.LayerNorm(spec.width)
        self.mlp_in = nn.Linear(spec.width, 4 * spec.width)
        self.mlp_out = nn.Linear(4 * spec.width, spec.width)
        self.residual_dropout = nn.Dropout(spec.dropout)
        # GPT-2 scales the projections into the residual stream by depth to keep its variance flat.
        _initialise(self, seed, residual_std=INIT_STD / math.sqrt(2 * spec.layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.residual_dropout(self._attend(self.attention_norm(hidden)))
        mlp = self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(hidden))))
        return hidden + self.residual_dropout(mlp)

    def _attend(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        query, key, value = (
            part.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
            for part in self.qkv(hidden).split(width, dim=2)
        )
        attended = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.attention_out(attended.transpose(1, 2).reshape(batch, length, width))


class Head(nn.Module):
    """Final norm and the projection to vocabulary logits."""

    def __init__(self, spec: ModelSpec, seed: int):
        super().__init__()
        self.norm = nn.LayerNorm(spec.width)
        self.logits = nn.Linear(spec.width, spec.vocabulary_size, bias=False)
        _initialise(self, seed, residual_std=INIT_STD)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(self.norm(hidden))


def layer_recipes(spec: ModelSpec, seed: int) -> list[tuple[type[nn.Module], ModelSpec, int]]:
    """(class, spec, seed) for every layer in order; seeds depend only on the layer's index."""
    classes = [Embedding, *[Block] * spec.layers, Head]
    return [(cls, spec, seed * 1_000_003 + index) for index, cls in enumerate(classes)]


class GPT(nn.Module):
    """The whole model on one rank (data parallel and ZeRO); pipelines use `layer_recipes`."""

    def __init__(self, spec: ModelSpec, seed: int):
        super().__init__()
        self.activation_checkpointing = spec.activation_checkpointing
        self.layers = nn.ModuleList(cls(*args) for cls, *args in layer_recipes(spec, seed))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = tokens
        for layer in self.layers:
            if self.activation_checkpointing and self.training and isinstance(layer, Block):
                hidden = checkpoint(layer, hidden, use_reentrant=False)
            else:
                hidden = layer(hidden)
        return hidden


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the training precision."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _initialise(module: nn.Module, seed: int, residual_std: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif "norm" in name:
                parameter.fill_(1.0)
            else:
                std = residual_std if name.endswith("_out.weight") else INIT_STD
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
