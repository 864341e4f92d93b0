"""Llama and GPT-2 as pieces (embeddings, decoder layers, final norm, output projection), so
their decoder layers can be split into pipeline stages and recomputed one at a time.

A piece holds the Hugging Face modules it runs under their paths in the whole model (the first
Llama block keeps `model.layers.0.self_attn.q_proj.weight`), so the pieces' state dicts put
together are the model's state dict: pretrained weights load by name, and checkpoints export
to a folder `transformers` opens. An `Adapter` says where an architecture keeps each piece;
adding an architecture of the same shape is one more entry in `ADAPTERS`.

Blocks run without an attention mask: SDPA then applies the causal mask itself, as the whole
model does for a batch without padding (training windows have none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from shipyard.models.huggingface.tensor_parallel import COLUMN, ROW
from shipyard.models.tensor_parallel import TensorParallel, copy_to_group


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its pieces, and how tensor parallelism splits a block."""

    embeddings: tuple[str, ...]  # the token embedding first, then what adds positions
    layers: str  # the ModuleList of decoder layers
    norm: str
    head: str = "lm_head"
    rotary: str | None = None  # rotary position embeddings every block computes
    dropout: str | None = None  # dropout after the embeddings
    block_plan: dict[str, tuple[str, int]] = field(default_factory=dict)
    conv1d: bool = False  # GPT-2 stores its projections as (in, out)
    after_split: Callable[[nn.Module, int], None] | None = None  # fix attributes of a split block


def _gpt2_split_size(block: nn.Module, tensor_parallel: int) -> None:
    # GPT-2's attention splits its fused projection at split_size = width; a rank holds 1/t.
    attention = block.get_submodule("attn")
    attention.split_size = attention.split_size // tensor_parallel


ADAPTERS = {
    "llama": Adapter(
        embeddings=("model.embed_tokens",),
        layers="model.layers",
        norm="model.norm",
        rotary="model.rotary_emb",
        block_plan={
            "self_attn.q_proj": (COLUMN, 1),
            "self_attn.k_proj": (COLUMN, 1),
            "self_attn.v_proj": (COLUMN, 1),
            "self_attn.o_proj": (ROW, 1),
            "mlp.gate_proj": (COLUMN, 1),
            "mlp.up_proj": (COLUMN, 1),
            "mlp.down_proj": (ROW, 1),
        },
    ),
    "gpt2": Adapter(
        embeddings=("transformer.wte", "transformer.wpe"),
        layers="transformer.h",
        norm="transformer.ln_f",
        dropout="transformer.drop",
        block_plan={
            "attn.c_attn": (COLUMN, 3),
            "attn.c_proj": (ROW, 1),
            "mlp.c_fc": (COLUMN, 1),
            "mlp.c_proj": (ROW, 1),
        },
        conv1d=True,
        after_split=_gpt2_split_size,
    ),
}


class Piece(nn.Module):
    """Part of a Hugging Face model, its modules kept under their paths in the whole model."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        self.paths = tuple(parts)
        for path, module in parts.items():
            _attach(self, path, module)

    def part(self, index: int = 0) -> nn.Module:
        return self.get_submodule(self.paths[index])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.part()(inputs)


class TokenEmbedding(Piece):
    """Token ids (batch, sequence) -> hidden states."""


class LearnedPositions(Piece):
    """GPT-2: adds the position embedding, then embedding dropout."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        hidden = hidden + self.part()(positions)
        return self.part(1)(hidden) if len(self.paths) > 1 else hidden


class DecoderBlock(Piece):
    """One decoder layer; with rotary embeddings, it computes their cos and sin itself (they
    depend only on positions), so nothing but hidden states crosses a pipeline stage."""

    def __init__(self, parts: dict[str, nn.Module], rotary: nn.Module | None):
        super().__init__(parts)
        self.rotary = rotary  # no persistent state: not in the state dict

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.part()
        if self.rotary is None:
            return layer(hidden)
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        return layer(hidden, position_embeddings=self.rotary(hidden, positions))


class Norm(Piece):
    """The final norm."""


class Head(Piece):
    """The output projection to logits (this rank's share of the vocabulary under tensor
    parallelism)."""


class TiedHead(nn.Module):
    """The output projection tied to the token embedding: it reads the embedding piece's
    weight and holds none of its own (in a pipeline, DeepSpeed ties the two stages' copies)."""

    def __init__(self, embedding: TokenEmbedding, tp: TensorParallel):
        super().__init__()
        self.__dict__["embedding"] = embedding  # a reference, not a second registration
        self.tp = tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return tied_logits(self.embedding, hidden, self.tp)


def tied_logits(embedding: TokenEmbedding, hidden: torch.Tensor, tp: TensorParallel):
    """Logits from the token embedding's weight (this rank's rows under tensor parallelism)."""
    return F.linear(copy_to_group(hidden, tp), embedding.part().weight)


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at dotted `path` under `root`, making plain containers on the way."""
    *parents, name = path.split(".")
    node = root
    for parent in parents:
        if not hasattr(node, parent):
            node.add_module(parent, nn.Module())
        node = getattr(node, parent)
    node.add_module(name, module)
