"""Building a Llama or GPT-2 on one rank, piece by piece, from its skeleton on the meta device.

The skeleton is the whole transformers model with shapes and no memory. Each piece takes its
modules from it, is materialised alone, and gets its weights: drawn with the architecture's own
initialisation from (job seed, piece index), or read by name from the pretrained folder. Under
tensor parallelism the piece is then cut into this rank's share. So a rank holds only what its
stage and shard need, and any layout of the same job starts from the same model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from shipyard.models.family import PieceStack, PipelineLayers, piece_seed, seeded
from shipyard.models.huggingface.pieces import (
    Adapter,
    DecoderBlock,
    Head,
    LearnedPositions,
    Norm,
    Piece,
    TiedHead,
    TokenEmbedding,
    tied_logits,
)
from shipyard.models.huggingface.tensor_parallel import (
    VocabularyParallelHead,
    split_embedding,
    split_linears,
)
from shipyard.models.huggingface.weights import WeightFolder
from shipyard.models.tensor_parallel import TensorParallel, mark_sharded

Recipe = tuple[type, dict[str, Any]]  # a piece's class and the skeleton modules it holds


@dataclass(frozen=True)
class PieceBuilder:
    """Everything one rank needs to build its pieces of one model."""

    adapter: Adapter
    skeleton: nn.Module
    weights: WeightFolder | None  # None: random weights from `seed`
    seed: int
    tp: TensorParallel
    tied: bool  # the output projection is the token embedding
    sharding: dict[str, tuple[int, int]]

    @property
    def leading(self) -> int:
        """How many input pieces come before the first block."""
        return len(self.adapter.embeddings)

    def recipes(self) -> list[Recipe]:
        """Every piece in order: embeddings, decoder layers, final norm, output projection."""
        adapter, skeleton = self.adapter, self.skeleton
        token_path, *position_paths = adapter.embeddings
        recipes: list[Recipe] = [(TokenEmbedding, {token_path: skeleton.get_submodule(token_path)})]
        if position_paths:
            parts = {path: skeleton.get_submodule(path) for path in position_paths}
            if adapter.dropout:
                parts[adapter.dropout] = skeleton.get_submodule(adapter.dropout)
            recipes.append((LearnedPositions, parts))
        rotary = skeleton.get_submodule(adapter.rotary) if adapter.rotary else None
        for index, layer in enumerate(skeleton.get_submodule(adapter.layers)):
            parts = {f"{adapter.layers}.{index}": layer, "rotary": copy.deepcopy(rotary)}
            recipes.append((DecoderBlock, parts))
        recipes.append((Norm, {adapter.norm: skeleton.get_submodule(adapter.norm)}))
        if self.tied:
            recipes.append((TiedHead, {}))
        else:
            recipes.append((Head, {adapter.head: skeleton.get_submodule(adapter.head)}))
        return recipes

    def whole(self, checkpointing: bool) -> PieceStack:
        """Every piece, in one stack (data parallel and ZeRO)."""
        pieces: list[nn.Module] = []
        for index, (piece_class, parts) in enumerate(self.recipes()):
            if piece_class is TiedHead:
                pieces.append(TiedHead(pieces[0], self.tp))
            else:
                pieces.append(self.piece(index, piece_class, parts))
        layers = len(pieces) - self.leading - 2
        return PieceStack(pieces, range(self.leading, self.leading + layers), checkpointing)

    def pipeline(self) -> PipelineLayers:
        """DeepSpeed layer specs: each stage materialises only its own pieces; a tied embedding
        is one TiedLayerSpec on the first and the last stage (DeepSpeed keeps the copies equal
        and sums their gradients)."""
        from shipyard.models.pipeline_specs import PieceSpec, TiedPieceSpec

        recipes = self.recipes()

        def maker(index: int):
            return lambda: self.piece(index, *recipes[index])

        def tied_embedding(**options) -> TiedPieceSpec:
            weight = f"{self.adapter.embeddings[0]}.weight"
            return TiedPieceSpec(
                maker(0), "embedding", TokenEmbedding, tied_weight_attr=[weight], **options
            )

        layers: list = []
        for index, (piece_class, _) in enumerate(recipes):
            if self.tied and index == 0:
                layers.append(tied_embedding())
            elif piece_class is TiedHead:
                layers.append(tied_embedding(forward_fn=partial(_tied_head, tp=self.tp)))
            else:
                layers.append(PieceSpec(maker(index), piece_class))
        return PipelineLayers(layers, self.leading, 2, ["DecoderBlock"])

    def piece(self, index: int, piece_class: type, parts: dict[str, Any]) -> Piece:
        """Piece `index`, materialised on this rank with its weights, then split for `tp`."""
        if piece_class is DecoderBlock:
            parts = dict(parts)
            piece = DecoderBlock(parts, parts.pop("rotary"))
        else:
            piece = piece_class(parts)
        piece.to_empty(device=torch.get_default_device())  # the meta device when only counting
        with torch.no_grad():
            if self.weights is None:
                with seeded(piece_seed(self.seed, index)):
                    for module in _children_first(piece):
                        self.skeleton._init_weights(module)
            else:
                piece.load_state_dict(self.weights.load(piece.state_dict()), strict=True)
                for module in piece.modules():  # buffers computed, not saved (rotary)
                    if "RotaryEmbedding" in type(module).__name__:
                        self.skeleton._init_weights(module)
        if self.tp.active:
            self._split(piece)
        return piece

    def _split(self, piece: Piece) -> None:
        adapter, tp = self.adapter, self.tp
        if isinstance(piece, DecoderBlock):
            split_linears(piece.part(), adapter.block_plan, tp, adapter.conv1d)
            if adapter.after_split:
                adapter.after_split(piece.part(), tp.size)
        elif isinstance(piece, TokenEmbedding):
            _replace(piece, piece.paths[0], split_embedding(piece.part(), tp))
        elif isinstance(piece, Head):
            _replace(piece, piece.paths[0], VocabularyParallelHead(piece.part(), tp))
        mark_sharded(piece, self.sharding)


def _tied_head(embedding: TokenEmbedding, hidden: torch.Tensor, tp: TensorParallel):
    return tied_logits(embedding, hidden, tp)


def _children_first(module: nn.Module):
    """Modules of `module`, each after its children (the order transformers initialises in,
    so a parent's re-initialisation, such as GPT-2's scaled projections, wins)."""
    for child in module.children():
        yield from _children_first(child)
    yield module


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)
