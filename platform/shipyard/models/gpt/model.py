"""A small GPT built from `GptModelSpec`, as a list of layers so DeepSpeed can pipeline it.

Each layer initialises its own weights from `(seed, layer index)`, so the same spec and seed give
the same model whether it is built whole, split into pipeline stages, sharded by ZeRO-3, or split
by tensor parallelism (`TensorParallel`: each rank keeps its share of the full weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shipyard.models.tensor_parallel import (
    SINGLE,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabularyParallelEmbedding,
    attention_dropout_seed,
    mark_sharded,
    shard,
    sharding_of,
)
from shipyard.spec.model import GptModelSpec

INIT_STD = 0.02


class Embedding(nn.Module):
    """Token and learned position embeddings: token ids (batch, seq) → hidden (batch, seq, width)."""

    def __init__(self, spec: GptModelSpec, seed: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tokens = VocabularyParallelEmbedding(spec.vocabulary_size, spec.width, tp)
        self.positions = nn.Embedding(spec.sequence_length, spec.width)
        self.dropout = nn.Dropout(spec.dropout)
        _initialise(self, seed, INIT_STD, tp)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.dropout(self.tokens(tokens) + self.positions(positions))


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP, each with a residual.

    Under tensor parallelism this rank holds heads/tp heads and 4·width/tp MLP units."""

    def __init__(self, spec: GptModelSpec, seed: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.heads = spec.heads // tp.size
        self.head_width = spec.width // spec.heads
        self.dropout = spec.dropout
        self.attention_norm = nn.LayerNorm(spec.width)
        self.qkv = ColumnParallelLinear(spec.width, 3 * spec.width, tp)
        self.attention_out = RowParallelLinear(spec.width, spec.width, tp)
        self.mlp_norm = nn.LayerNorm(spec.width)
        self.mlp_in = ColumnParallelLinear(spec.width, 4 * spec.width, tp)
        self.mlp_out = RowParallelLinear(4 * spec.width, spec.width, tp)
        self.residual_dropout = nn.Dropout(spec.dropout)
        # GPT-2 scales the projections into the residual stream by depth to keep its variance flat.
        _initialise(self, seed, INIT_STD / math.sqrt(2 * spec.layers), tp)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.residual_dropout(self._attend(self.attention_norm(hidden)))
        mlp = self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(hidden))))
        return hidden + self.residual_dropout(mlp)

    def _attend(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape
        query, key, value = (
            part.view(batch, length, self.heads, self.head_width).transpose(1, 2)
            for part in self.qkv(hidden).chunk(3, dim=2)
        )
        dropout = self.dropout if self.training else 0.0
        if dropout and self.tp.active:
            # Each rank's heads drop their own pattern; the replicated residual stream around
            # them keeps the generator the group shares.
            with torch.random.fork_rng(devices=[query.device] if query.is_cuda else []):
                torch.manual_seed(attention_dropout_seed(self.tp))
                attended = F.scaled_dot_product_attention(
                    query, key, value, is_causal=True, dropout_p=dropout
                )
        else:
            attended = F.scaled_dot_product_attention(
                query, key, value, is_causal=True, dropout_p=dropout
            )
        return self.attention_out(attended.transpose(1, 2).reshape(batch, length, -1))


class Head(nn.Module):
    """Final norm and the projection to vocabulary logits (under tensor parallelism, this
    rank's share of the vocabulary: `language_model_loss` never gathers them)."""

    def __init__(self, spec: GptModelSpec, seed: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.norm = nn.LayerNorm(spec.width)
        self.logits = ColumnParallelLinear(spec.width, spec.vocabulary_size, tp, bias=False)
        _initialise(self, seed, INIT_STD, tp)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(self.norm(hidden))


def layer_recipes(
    spec: GptModelSpec, seed: int, tp: TensorParallel = SINGLE
) -> list[tuple[type[nn.Module], GptModelSpec, int, TensorParallel]]:
    """(class, spec, seed, tp) for every layer in order; seeds depend only on the layer's index."""
    classes = [Embedding, *[Block] * spec.layers, Head]
    return [(cls, spec, seed * 1_000_003 + index, tp) for index, cls in enumerate(classes)]


class GPT(nn.Module):
    """The whole model on one rank (data parallel and ZeRO); pipelines use `layer_recipes`."""

    def __init__(self, spec: GptModelSpec, seed: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.activation_checkpointing = spec.activation_checkpointing
        self.layers = nn.ModuleList(cls(*args) for cls, *args in layer_recipes(spec, seed, tp))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = tokens
        for layer in self.layers:
            if self.activation_checkpointing and self.training and isinstance(layer, Block):
                hidden = checkpoint(layer, hidden, use_reentrant=False)
            else:
                hidden = layer(hidden)
        return hidden


def _initialise(module: nn.Module, seed: int, residual_std: float, tp: TensorParallel) -> None:
    """Draw every weight at its full size, in the same order whatever `tp`, and keep this rank's
    share: split or not, the model is the same."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif "norm" in name:
                parameter.fill_(1.0)
            else:
                std = residual_std if name.endswith("_out.weight") else INIT_STD
                split = sharding_of(name)
                shape = list(parameter.shape)
                if split:
                    shape[split[0]] *= tp.size
                full = torch.randn(shape, generator=generator) * std
                parameter.copy_(shard(full, *split, tp) if split else full)
    if tp.active:
        mark_sharded(module)
