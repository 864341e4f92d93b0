"""Tensor parallelism for Hugging Face layers: their linear layers cut into Shipyard's shards.

A plan names each linear layer of a block as column-parallel (each rank computes its share of
the heads or hidden units from the whole input) or row-parallel (each rank multiplies its share
of the input; one all-reduce sums the partial outputs). Attention reads its head count from the
projections' width, so a rank holding heads/t heads just runs them. The token embedding and the
output projection split the vocabulary, and the loss never gathers the logits.

A split layer keeps its weight's name and layout (nn.Linear stores (out, in), GPT-2's Conv1D
(in, out)), so a tensor-parallel checkpoint joins back into the Hugging Face state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shipyard.models.tensor_parallel import (
    TensorParallel,
    VocabularyParallelEmbedding,
    copy_to_group,
    shard,
    sum_over_group,
)

COLUMN, ROW = "column", "row"


class ColumnParallel(nn.Module):
    """A linear layer's output features split across ranks (`parts` > 1: the output is that
    many matrices side by side, each split alike, as GPT-2's fused query-key-value)."""

    def __init__(self, full: nn.Module, tp: TensorParallel, parts: int, conv1d: bool):
        super().__init__()
        self.tp, self.conv1d = tp, conv1d
        out_dim = 1 if conv1d else 0
        self.weight = nn.Parameter(shard(full.weight.detach(), out_dim, parts, tp).clone())
        bias = full.bias
        self.bias = None if bias is None else nn.Parameter(shard(bias.detach(), 0, parts, tp))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = copy_to_group(hidden, self.tp)
        if self.conv1d:  # as GPT-2's Conv1D computes it, so each output is rounded alike
            rows = hidden.reshape(-1, hidden.shape[-1])
            out = (
                torch.addmm(self.bias, rows, self.weight)
                if self.bias is not None
                else rows @ self.weight
            )
            return out.view(*hidden.shape[:-1], -1)
        return F.linear(hidden, self.weight, self.bias)


class RowParallel(nn.Module):
    """A linear layer's input features split across ranks: the partial products are summed
    over the group, then the bias is added once."""

    def __init__(self, full: nn.Module, tp: TensorParallel, conv1d: bool):
        super().__init__()
        self.tp, self.conv1d = tp, conv1d
        in_dim = 0 if conv1d else 1
        self.weight = nn.Parameter(shard(full.weight.detach(), in_dim, 1, tp).clone())
        bias = full.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        partial = hidden @ self.weight if self.conv1d else F.linear(hidden, self.weight)
        total = sum_over_group(partial, self.tp)
        return total if self.bias is None else total + self.bias


class VocabularyParallelHead(nn.Module):
    """The output projection with the vocabulary split: this rank's logits only."""

    def __init__(self, full: nn.Linear, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(shard(full.weight.detach(), 0, 1, tp).clone())
        bias = full.bias
        self.bias = None if bias is None else nn.Parameter(shard(bias.detach(), 0, 1, tp))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_group(hidden, self.tp), self.weight, self.bias)


def split_embedding(full: nn.Embedding, tp: TensorParallel) -> VocabularyParallelEmbedding:
    """`full` as this rank's rows of the vocabulary."""
    split = VocabularyParallelEmbedding(
        full.num_embeddings, full.embedding_dim, tp, full.padding_idx
    )
    with torch.no_grad():
        split.weight.copy_(shard(full.weight.detach(), 0, 1, tp))
    return split


def split_linears(
    module: nn.Module, plan: dict[str, tuple[str, int]], tp: TensorParallel, conv1d: bool
) -> None:
    """Replace every linear layer of `module` that `plan` names (by the end of its path) with
    its tensor-parallel share."""
    for name, child in list(module.named_modules()):
        for suffix, (kind, parts) in plan.items():
            if name == suffix or name.endswith(f".{suffix}"):
                parent_name, _, attribute = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                split = (
                    ColumnParallel(child, tp, parts, conv1d)
                    if kind == COLUMN
                    else RowParallel(child, tp, conv1d)
                )
                setattr(parent, attribute, split)


def sharding_table(
    plan: dict[str, tuple[str, int]], conv1d: bool, vocabulary: tuple[str, ...]
) -> dict[str, tuple[int, int]]:
    """How each split weight is cut, keyed by the last two parts of its name: what joins the
    shards back (`join_shards`) and what DeepSpeed's gradient norm counts per rank."""
    table: dict[str, tuple[int, int]] = {}
    for suffix, (kind, parts) in plan.items():
        layer = suffix.rsplit(".", 1)[-1]
        if kind == COLUMN:
            table[f"{layer}.weight"] = (1 if conv1d else 0, parts)
            table[f"{layer}.bias"] = (0, parts)
        else:
            table[f"{layer}.weight"] = (0 if conv1d else 1, 1)
    for path in vocabulary:
        layer = path.rsplit(".", 1)[-1]
        table[f"{layer}.weight"] = (0, 1)
        table[f"{layer}.bias"] = (0, 1)
    return table
