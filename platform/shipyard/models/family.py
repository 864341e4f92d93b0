"""The protocol every model family answers, and the piece stack they share.

train/, plan/ and serve/ see a model only through `ModelFamily`: how many blocks it has, its
exact size, which layouts it can train in (and why not), how to build it whole or as pipeline
layers on this rank, how tensor parallelism splits its weights, how its trained weights become
a Hugging Face folder, and how a replica loads that folder back for serving.

A model is built as pieces: input pieces (embeddings), `layers` blocks, and output pieces
(final norm, logits). Each piece draws its own random weights from `(seed, piece index)`, so
the same job and seed give the same model whether it is built whole, split into pipeline
stages, sharded by ZeRO-3, or split by tensor parallelism.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from shipyard.models.size import ModelSize
    from shipyard.models.tensor_parallel import TensorParallel
    from shipyard.spec.job import TrainSpec

Sharding = dict[str, tuple[int, int]]  # parameter name's last two parts -> (dim, parts)


@dataclass(frozen=True)
class PipelineLayers:
    """A model as DeepSpeed pipeline layers: `leading` input pieces, the blocks, `trailing`
    output pieces. `layers` are LayerSpecs (TiedLayerSpecs for a tied embedding), so each stage
    builds only its own; `checkpointable` names the block classes to recompute."""

    layers: list[Any]
    leading: int
    trailing: int
    checkpointable: list[str] = field(default_factory=list)


class Generator(Protocol):
    """What a serving replica decodes with (models/generation.py, models/gpt/generation.py)."""

    context_length: int

    def start(self, request: Any) -> Any: ...

    def step(self, sequences: list[Any]) -> None: ...

    def check(self) -> None: ...


class ModelFamily(Protocol):
    """One kind of model (built-in GPT, Hugging Face, your factory) as Shipyard uses it."""

    spec: Any

    @property
    def layers(self) -> int:
        """How many blocks the model has (what pipeline stages split)."""
        ...

    @property
    def vocabulary_size(self) -> int: ...

    @property
    def sharding(self) -> Sharding:
        """How tensor parallelism splits each weight (empty: it cannot)."""
        ...

    def check(self, train: TrainSpec, tokenizer_vocabulary: int) -> None:
        """Raise ValueError (naming model and train fields) if the model cannot be built, its
        vocabulary does not cover the tokenizer's, or it cannot be trained in the layout
        `train` asks for."""
        ...

    def size(self) -> ModelSize:
        """Exact parameter counts, FLOPs and activation bytes, by piece."""
        ...

    def layout_problem(self, pipeline_stages: int, tensor_parallel: int) -> str | None:
        """Why the model cannot be split into these stages and shards (None if it can)."""
        ...

    def build(self, seed: int, tp: TensorParallel) -> nn.Module:
        """The whole model on this rank (its tensor-parallel share): token ids (batch,
        sequence) to logits (batch, sequence, vocabulary or this rank's share of it)."""
        ...

    def block(self, seed: int) -> nn.Module | None:
        """One block alone, hidden states (batch, sequence, width) in and out, for timing (None
        if the model has no separable block)."""
        ...

    def tensor_parallel_widths(self) -> tuple[int, ...]:
        """The tensor-parallel widths the model splits into (the planner's options)."""
        ...

    def pipeline(self, seed: int, tp: TensorParallel) -> PipelineLayers:
        """The model as pipeline layers whose state dicts name weights as `build`'s do."""
        ...

    def export(
        self, state: dict[str, torch.Tensor], folder: Path, end_of_text: int | None = None
    ) -> list[str]:
        """Write the consolidated weights (named as `build`'s state dict) and config into
        `folder` as a Hugging Face folder, generation ending at `end_of_text`; returns the
        files written."""
        ...

    def load_module(self, folder: Path, device: str) -> nn.Module:
        """The exported model (token ids to logits) from the folder `export` wrote."""
        ...

    def load_for_serving(self, folder: Path, device: str) -> Generator:
        """What a serving replica decodes with, from the folder `export` wrote."""
        ...


class PieceStack(nn.Module):
    """A model as its pieces in order; block pieces are recomputed in backward when
    `checkpointing` is on. Its state dict names weights `layers.<piece>.<name>`, as the pipeline
    checkpoint's per-layer files are numbered."""

    def __init__(self, pieces: list[nn.Module], blocks: range, checkpointing: bool):
        super().__init__()
        self.layers = nn.ModuleList(pieces)
        self.blocks = blocks
        self.checkpointing = checkpointing

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = tokens
        for index, piece in enumerate(self.layers):
            if self.checkpointing and self.training and index in self.blocks:
                hidden = checkpoint(piece, hidden, use_reentrant=False)
            else:
                hidden = piece(hidden)
        return hidden


def check_vocabulary(field: str, model: int, tokenizer: int) -> None:
    """ValueError naming `field` if the model's vocabulary is smaller than the tokenizer's."""
    if model < tokenizer:
        raise ValueError(
            f"{field}: {model} is smaller than the tokenizer's {tokenizer} tokens; the model "
            f"could never predict the rest. To fix: set it to at least {tokenizer}."
        )


def piece_seed(seed: int, index: int) -> int:
    """The seed of piece `index`: depends only on the job's seed and the piece's place."""
    return seed * 1_000_003 + index


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's global generator seeded for the block, restored after (HF initialisers and user
    factories draw from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def drop_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`state` with `prefix` removed from every name that has it."""
    return {name.removeprefix(prefix): tensor for name, tensor in state.items()}


def stack_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PieceStack's state dict (`layers.<piece>.<name>`) as the pieces name it."""
    return {name.split(".", 2)[2]: tensor for name, tensor in state.items()}


def logits_of(output: Any) -> torch.Tensor:
    """Logits from whatever a module returned: a tensor, or an output with `.logits`."""
    return output if isinstance(output, torch.Tensor) else output.logits
