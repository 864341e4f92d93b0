"""Tensor parallelism for the GPT, Megatron style: every block's attention heads and MLP units,
and the vocabulary, split across the ranks of one tensor-parallel group.

A block is a column-parallel layer (each rank computes its share of the heads or hidden units
from the whole input) followed by a row-parallel one (each rank multiplies its share, and one
all-reduce sums the partial outputs). So a block costs two all-reduces forward and two backward,
placed by the autograd functions below. The embedding and the output head split the vocabulary:
each rank looks up or scores its own rows, and the cross-entropy is computed without ever
gathering the full logits.

`SHARDING` says which parameters are split and how; initialisation, checkpoint consolidation and
DeepSpeed's gradient-norm bookkeeping all read it, so a tp=N model is the tp=1 model cut in N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Parameter name (its last two parts) -> (dimension split across ranks, parts). A fused qkv
# weight is three matrices: each rank takes its heads' rows of each of q, k and v.
SHARDING: dict[str, tuple[int, int]] = {
    "tokens.weight": (0, 1),
    "qkv.weight": (0, 3),
    "qkv.bias": (0, 3),
    "attention_out.weight": (1, 1),
    "mlp_in.weight": (0, 1),
    "mlp_in.bias": (0, 1),
    "mlp_out.weight": (1, 1),
    "logits.weight": (0, 1),
}


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group (`group` None: the default group)."""

    size: int = 1
    rank: int = 0
    group: Any = None
    grid: Any = None  # DeepSpeed's PipelineParallelGrid the group comes from, if any

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = TensorParallel()


def sharding_of(
    name: str, sharding: dict[str, tuple[int, int]] = SHARDING
) -> tuple[int, int] | None:
    """How the parameter called `name` (e.g. `layers.3.qkv.weight`) is split, or None if every
    rank holds all of it; `sharding` is the model family's table (the GPT's by default)."""
    return sharding.get(".".join(name.split(".")[-2:]))


def shard(full: torch.Tensor, dim: int, parts: int, tp: TensorParallel) -> torch.Tensor:
    """This rank's share of a full tensor split along `dim` (each of its `parts` split alike)."""
    pieces = full.chunk(parts, dim=dim)
    return torch.cat([piece.chunk(tp.size, dim=dim)[tp.rank] for piece in pieces], dim=dim)


def unshard(shards: Sequence[torch.Tensor], dim: int, parts: int) -> torch.Tensor:
    """The full tensor from every rank's share, in rank order: the inverse of `shard`."""
    pieces = [shard_.chunk(parts, dim=dim) for shard_ in shards]
    return torch.cat(
        [
            torch.cat([rank_pieces[part] for rank_pieces in pieces], dim=dim)
            for part in range(parts)
        ],
        dim=dim,
    )


def join_shards(
    states: Sequence[dict[str, torch.Tensor]], sharding: dict[str, tuple[int, int]] = SHARDING
) -> dict[str, torch.Tensor]:
    """One state dict from every tensor-parallel rank's, in rank order: split tensors joined,
    replicated ones taken from rank 0."""
    return {
        name: unshard([state[name] for state in states], *split) if split else tensor
        for name, tensor in states[0].items()
        for split in [sharding_of(name, sharding)]
    }


class _CopyToGroup(torch.autograd.Function):
    """Forward: the input as it is (every rank has all of it). Backward: sum the gradients the
    ranks' shards produced for it."""

    @staticmethod
    def forward(ctx, tensor, tp):
        ctx.tp = tp
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.tp), None


class _SumOverGroup(torch.autograd.Function):
    """Forward: sum the ranks' partial outputs. Backward: every rank's share gets the gradient."""

    @staticmethod
    def forward(ctx, tensor, tp):
        return _all_reduce(tensor, tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """Forward: concatenate the ranks' shares along the last dimension. Backward: each rank keeps
    the gradient of its share."""

    @staticmethod
    def forward(ctx, tensor, tp):
        ctx.tp = tp
        shares = [torch.empty_like(tensor) for _ in range(tp.size)]
        dist.all_gather(shares, tensor.contiguous(), group=tp.group)
        return torch.cat(shares, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.tp.size, dim=-1)[ctx.tp.rank].contiguous(), None


def _all_reduce(tensor: torch.Tensor, tp: TensorParallel, op=dist.ReduceOp.SUM) -> torch.Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=op, group=tp.group)
    return tensor


def copy_to_group(tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _CopyToGroup.apply(tensor, tp) if tp.active else tensor


def sum_over_group(tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _SumOverGroup.apply(tensor, tp) if tp.active else tensor


def gather_last_dim(tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _GatherLastDim.apply(tensor, tp) if tp.active else tensor


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's output rows split across ranks: the input whole, the output this
    rank's share (`parts` > 1: the output is that many matrices, each split alike)."""

    def __init__(self, inputs: int, outputs: int, tp: TensorParallel, bias: bool = True):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(outputs // tp.size, inputs))
        self.bias = nn.Parameter(torch.empty(outputs // tp.size)) if bias else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_group(hidden, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's input columns split across ranks: the input this rank's share, the
    output whole (the partial products summed over the group, then the bias added once)."""

    def __init__(self, inputs: int, outputs: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(outputs, inputs // tp.size))
        self.bias = nn.Parameter(torch.empty(outputs))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return sum_over_group(F.linear(hidden, self.weight), self.tp) + self.bias


LINEAR_LAYERS = (ColumnParallelLinear, RowParallelLinear)


class VocabularyParallelEmbedding(nn.Module):
    """Token embeddings with the vocabulary's rows split across ranks: each rank looks up the
    tokens it holds (zeros for the others) and the group sums the lookups. A `padding_idx`
    row gets no gradient, on whichever rank holds it."""

    def __init__(self, vocabulary: int, width: int, tp: TensorParallel, padding_idx=None):
        super().__init__()
        self.tp = tp
        self.rows = vocabulary // tp.size
        self.weight = nn.Parameter(torch.empty(self.rows, width))
        local_padding = None if padding_idx is None else padding_idx - tp.rank * self.rows
        self.padding_idx = local_padding if local_padding in range(self.rows) else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.tp.active:
            return F.embedding(tokens, self.weight, self.padding_idx)
        local = tokens - self.tp.rank * self.rows
        elsewhere = (local < 0) | (local >= self.rows)
        found = F.embedding(local.masked_fill(elsewhere, 0), self.weight, self.padding_idx)
        return sum_over_group(found.masked_fill(elsewhere.unsqueeze(-1), 0.0), self.tp)


class _VocabularyParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits whose vocabulary is split across ranks, per token, without
    gathering them: the max, the softmax denominator and the target's logit are each one
    all-reduce of a (tokens,) vector."""

    @staticmethod
    def forward(ctx, logits, targets, tp):
        logits = logits - _all_reduce(logits.max(dim=-1).values, tp, dist.ReduceOp.MAX)[:, None]
        rows = logits.shape[-1]
        local = targets - tp.rank * rows
        elsewhere = (local < 0) | (local >= rows)
        local = local.masked_fill(elsewhere, 0)
        target_logit = logits.gather(1, local[:, None]).squeeze(1).masked_fill(elsewhere, 0.0)
        target_logit = _all_reduce(target_logit, tp)
        exponentials = logits.exp()
        denominator = _all_reduce(exponentials.sum(dim=-1), tp)
        softmax = exponentials / denominator[:, None]
        ctx.save_for_backward(softmax, local, elsewhere)
        return denominator.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, elsewhere = ctx.saved_tensors
        grad_logits = softmax.clone()
        rows = torch.arange(local.shape[0], device=local.device)
        grad_logits[rows, local] -= (~elsewhere).to(grad_logits.dtype)
        return grad_logits * grad[:, None], None, None


def parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, tp: TensorParallel
) -> torch.Tensor:
    """Mean next-token cross-entropy of (tokens, vocabulary share) logits, in fp32."""
    return _VocabularyParallelCrossEntropy.apply(logits.float(), targets, tp).mean()


def attention_dropout_seed(tp: TensorParallel) -> int:
    """A seed for dropout inside the split attention: drawn from the generator every rank of the
    group shares (so activation checkpointing's replay draws it again), then made this rank's
    own, so no two ranks drop the same pattern on different heads."""
    return int(torch.randint(0, 2**62, (1,)).item()) + tp.rank


def mark_sharded(module: nn.Module, sharding: dict[str, tuple[int, int]] = SHARDING) -> None:
    """Tag every split parameter the way DeepSpeed's gradient-norm code recognises them, so it
    sums split parameters over the group and counts replicated ones once."""
    for name, parameter in module.named_parameters():
        if sharding_of(name, sharding):
            parameter.tensor_model_parallel = True
            parameter.model_parallel = True
