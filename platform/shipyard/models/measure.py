"""A model's exact size, FLOPs and activation memory, read off the model on the meta device.

The model is built on the meta device (shapes, no memory, no weights) in bf16 and run forward
once on one sequence of the training length. That gives, with nothing allocated:
- parameters: counted per piece, a tied weight once;
- FLOPs: torch's FlopCounterMode over the forward, per block module;
- activations: every tensor autograd saves for backward (saved-tensor hooks), per block, the
  way a training step keeps them in bf16 (a norm that computes in fp32 keeps fp32).
Attention is measured as fused attention keeps it (query, key, value, output and one
log-sum-exp per row, as flash and memory-efficient SDPA do on GPUs), not as the meta device's
math fallback, which would also keep the sequence² score matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from shipyard.models.size import ModelSize


@dataclass(frozen=True)
class Pieces:
    """Where a model built on the meta device keeps its input pieces and blocks."""

    model: nn.Module
    inputs: list[nn.Module]  # embeddings
    blocks: list[nn.Module]
    forward: Callable[[torch.Tensor], torch.Tensor]  # token ids -> logits


def measure(
    pieces: Pieces,
    *,
    width: int,
    sequence_length: int,
    vocabulary_size: int,
    split: Callable[[str], bool] = lambda name: False,
) -> ModelSize:
    """The ModelSize of `pieces` (on the meta device); `split(name)` says whether tensor
    parallelism splits the parameter `name` (its name inside the model)."""
    names = {id(p): name for name, p in pieces.model.named_parameters()}
    everything = _unique(pieces.model.parameters())
    inputs = _unique(p for piece in pieces.inputs for p in piece.parameters())
    blocks = [_unique(block.parameters()) for block in pieces.blocks]
    in_blocks = {id(p) for block in blocks for p in block}
    in_inputs = {id(p) for p in inputs}
    outputs = [p for p in everything if id(p) not in in_blocks and id(p) not in in_inputs]
    tied = _tied(pieces.model, inputs)

    flops, activations = _forward_costs(pieces, sequence_length)
    layers = len(pieces.blocks)
    block = round(sum(_count(b) for b in blocks) / layers) if layers else 0
    embedding = _count(inputs)
    total = _count(everything)

    def split_count(parameters) -> int:
        return sum(p.numel() for p in parameters if split(names[id(p)]))

    return ModelSize(
        embedding=embedding,
        block=block,
        head=total - embedding - layers * block + tied,
        layers=layers,
        width=width,
        sequence_length=sequence_length,
        vocabulary_size=vocabulary_size,
        block_flops=sum(flops.blocks) / max(layers, 1) / sequence_length,
        head_flops=(flops.total - sum(flops.blocks)) / sequence_length,
        block_activation=sum(activations) / max(layers, 1) / sequence_length,
        shared=tied,
        embedding_split=split_count(inputs),
        block_split=round(sum(split_count(b) for b in blocks) / layers) if layers else 0,
        head_split=split_count(outputs) + (tied if split_count(inputs) else 0),
    )


@dataclass(frozen=True)
class _Flops:
    total: float
    blocks: list[float]


def _forward_costs(pieces: Pieces, sequence_length: int) -> tuple[_Flops, list[float]]:
    """One training forward of one sequence: FLOPs in all and per block, and bytes each
    block saves for backward."""
    block_of = {id(block): index for index, block in enumerate(pieces.blocks)}
    current: list[int | None] = [None]
    saved: list[dict[int, int]] = [{} for _ in pieces.blocks]
    parameters = {p.untyped_storage()._cdata for p in pieces.model.parameters()}

    def enter(module, _inputs):
        current[0] = block_of[id(module)]

    def leave(module, _inputs, _output):
        current[0] = None

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if current[0] is not None and storage._cdata not in parameters:
            saved[current[0]][storage._cdata] = storage.nbytes()
        return tensor

    hooks = [b.register_forward_pre_hook(enter) for b in pieces.blocks]
    hooks += [b.register_forward_hook(leave) for b in pieces.blocks]
    tokens = torch.zeros((1, sequence_length), dtype=torch.long, device="meta")
    was_training = pieces.model.training
    pieces.model.train()
    try:
        counter = FlopCounterMode(display=False)
        with counter, _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, _same):
            pieces.forward(tokens)
    finally:
        for hook in hooks:
            hook.remove()
        pieces.model.train(was_training)
    by_module = counter.get_flop_counts()
    fqn = {id(module): name for name, module in pieces.model.named_modules()}
    root = type(pieces.model).__name__
    per_block = [
        float(sum(by_module.get(f"{root}.{fqn[id(block)]}", {}).values()))
        for block in pieces.blocks
    ]
    flops = _Flops(float(counter.get_total_flops()), per_block)
    return flops, [float(sum(block.values())) for block in saved]


class _FusedAttention(torch.autograd.Function):
    """SDPA as fused kernels keep it for backward: inputs, output and one log-sum-exp per
    query row (the forward itself still runs, so its FLOPs are counted)."""

    @staticmethod
    def forward(ctx, query, key, value, options):
        with torch.no_grad():
            output = F.scaled_dot_product_attention(query, key, value, **options)
        row_statistics = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, row_statistics)
        return output

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - measurement never runs backward
        raise RuntimeError("measurement only")


class _RouteAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value, *rest = args
            names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            options = {**dict(zip(names, rest, strict=False)), **kwargs}
            return _FusedAttention.apply(query, key, value, options)
        return func(*args, **kwargs)


@contextmanager
def _fused_attention() -> Iterator[None]:
    with _RouteAttention():
        yield


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _unique(parameters) -> list[nn.Parameter]:
    seen, unique = set(), []
    for parameter in parameters:
        if id(parameter) not in seen:
            seen.add(id(parameter))
            unique.append(parameter)
    return unique


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def _tied(model: nn.Module, inputs: list[nn.Parameter]) -> int:
    """Parameters of the input pieces that an output piece also uses (tied embeddings): the
    ones the model registers under more than one name."""
    names: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        names[id(parameter)] = names.get(id(parameter), 0) + 1
    return sum(p.numel() for p in inputs if names.get(id(p), 0) > 1)
