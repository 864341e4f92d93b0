"""Your own PyTorch module as a model family: `model.factory: package.module:function`.

The contract (docs/models.md):
- Shipyard calls `function(vocabulary_size=…, sequence_length=…, **model.options)` on every
  rank with torch's generator seeded from `train.seed`, so every rank builds the same weights;
- the module maps token ids (batch, sequence) to logits (batch, sequence, vocabulary_size), as a
  tensor or an output with `.logits`;
- returned as an `nn.Sequential` (an input piece, blocks, an output piece), it can also be split
  into pipeline stages and recompute its blocks (activation checkpointing); any other module
  trains whole (data parallel, ZeRO 0-3, offload) and runs its own checkpointing if it wants;
- tensor parallelism is not offered: Shipyard cannot know how to cut an arbitrary module;
- a `transformers` PreTrainedModel exports as a folder transformers loads; any other module
  exports its safetensors weights with a manifest, and `shipyard serve` rebuilds it with the
  factory.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shipyard.models.export_files import save_weights
from shipyard.models.family import (
    PieceStack,
    PipelineLayers,
    check_vocabulary,
    drop_prefix,
    logits_of,
    seeded,
)
from shipyard.models.measure import Pieces, measure
from shipyard.models.size import ModelSize
from shipyard.models.tensor_parallel import SINGLE, TensorParallel
from shipyard.spec.model import BYTE_VOCABULARY, PythonModelSpec


class PythonFamily:
    """A module your factory builds."""

    def __init__(self, spec: PythonModelSpec):
        self.spec = spec

    @property
    def layers(self) -> int:
        pieces = self._pieces(self._meta_module())
        return max(len(pieces) - 2, 1) if pieces else 1

    @property
    def vocabulary_size(self) -> int:
        return self.spec.vocabulary_size

    @property
    def sharding(self) -> dict[str, tuple[int, int]]:
        return {}

    def check(self, train, tokenizer_vocabulary: int = BYTE_VOCABULARY) -> None:
        """The factory imports, returns a module whose logits have the vocabulary's width, the
        vocabulary covers the tokenizer's, and the module can be trained in the layout `train`
        asks for."""
        check_vocabulary("model.vocabulary_size", self.vocabulary_size, tokenizer_vocabulary)
        module = self._meta_module()
        tokens = torch.zeros((1, self.spec.sequence_length), dtype=torch.long, device="meta")
        try:
            logits = logits_of(module(tokens))
        except Exception as error:  # the user's forward; any failure is theirs to see
            raise ValueError(
                f"model.factory: {self.spec.factory}'s module failed on token ids of shape "
                f"(1, {self.spec.sequence_length}): {type(error).__name__}: {error}"
            ) from None
        expected = (1, self.spec.sequence_length, self.spec.vocabulary_size)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"model.factory: {self.spec.factory}'s module returned shape "
                f"{tuple(logits.shape)} for token ids (1, {self.spec.sequence_length}); it must "
                f"return logits {expected} (model.vocabulary_size {self.spec.vocabulary_size})."
            )
        problem = self.layout_problem(train.pipeline_stages, train.tensor_parallel)
        if problem:
            raise ValueError(problem)
        if self.spec.activation_checkpointing and not self._pieces(module):
            raise ValueError(
                "model.activation_checkpointing: Shipyard recomputes the blocks of an "
                "nn.Sequential; this factory returns a "
                f"{type(module).__name__}. To fix: return an nn.Sequential, or checkpoint "
                "inside your module and set activation_checkpointing: false."
            )

    def layout_problem(self, pipeline_stages: int, tensor_parallel: int) -> str | None:
        if tensor_parallel > 1:
            return (
                f"train.tensor_parallel: {tensor_parallel} cannot split a factory's module; "
                "Shipyard cannot know how to cut an arbitrary nn.Module. To fix: set "
                "tensor_parallel: 1 (ZeRO-3 also shards its parameters)."
            )
        if pipeline_stages > 1:
            pieces = self._pieces(self._meta_module())
            if not pieces:
                return (
                    f"train.pipeline_stages: {pipeline_stages} needs the factory to return an "
                    "nn.Sequential (input piece, blocks, output piece) that Shipyard can cut "
                    "into stages. To fix: return one, or set pipeline_stages: 1."
                )
            if pipeline_stages > len(pieces) - 2:
                return (
                    f"train.pipeline_stages: {pipeline_stages} is more than the module's "
                    f"{len(pieces) - 2} blocks. To fix: use at most {len(pieces) - 2} stages."
                )
        return None

    def tensor_parallel_widths(self) -> tuple[int, ...]:
        return (1,)

    def size(self) -> ModelSize:
        """Parameters, FLOPs and activations measured on the meta device."""
        module = self._meta_module().to(torch.bfloat16)
        pieces = self._pieces(module)
        tokens = torch.zeros((1, self.spec.sequence_length), dtype=torch.long, device="meta")
        if pieces:
            inputs, blocks = [pieces[0]], pieces[1:-1]
            width = pieces[0](tokens).shape[-1]
        else:
            inputs, blocks, width = [], [module], 0
        return measure(
            Pieces(module, inputs, blocks, lambda t: logits_of(module(t))),
            width=width,
            sequence_length=self.spec.sequence_length,
            vocabulary_size=self.spec.vocabulary_size,
        )

    def build(self, seed: int, tp: TensorParallel = SINGLE) -> nn.Module:
        module = self._module(seed)
        pieces = self._pieces(module)
        if pieces:
            return PieceStack(pieces, range(1, len(pieces) - 1), self.spec.activation_checkpointing)
        return PieceStack([_Logits(module)], range(0), False)

    def block(self, seed: int) -> nn.Module | None:
        """A Sequential's first block, hidden states in and out (None for other modules)."""
        pieces = self._pieces(self._module(seed))
        return pieces[1] if pieces else None

    def pipeline(self, seed: int, tp: TensorParallel = SINGLE) -> PipelineLayers:
        """The Sequential's children as pipeline layers (built whole on every rank: the
        factory cannot build one piece alone; each stage keeps its own)."""
        pieces = self._pieces(self._module(seed))
        blocks = sorted({type(piece).__name__ for piece in pieces[1:-1]})
        return PipelineLayers(list(pieces), leading=1, trailing=1, checkpointable=blocks)

    def export(
        self, state: dict[str, torch.Tensor], folder: Path, end_of_text: int | None = None
    ) -> list[str]:
        """Safetensors named as the module names its weights; a transformers model also gets
        its config, so transformers loads the folder."""
        module = self._meta_module()
        # A Sequential's children are the stack's pieces: `layers.3.x` is its `3.x`.
        prefix = "layers." if self._pieces(module) else "layers.0.module."
        names = drop_prefix(state, prefix)
        files = save_weights(names, folder)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(folder)
            files.append("config.json")
        return files

    def load_module(self, folder: Path, device: str) -> nn.Module:
        """The factory's module with the exported weights, returning logits."""
        from shipyard.models.export_files import load_weights

        module = self._module(seed=0)
        module.load_state_dict(load_weights(folder))
        return _Logits(module).to(device)

    def load_for_serving(self, folder: Path, device: str):
        """Without a KV cache, the generator recomputes the prefix for every new token."""
        from shipyard.data.tokenizer import saved_tokenizer
        from shipyard.models.generation import CausalLMGenerator

        tokenizer = saved_tokenizer(folder)
        model = self.load_module(folder, device).eval()
        length = self.spec.sequence_length
        return CausalLMGenerator(
            model, length, False, tokenizer.end_of_text, tokenizer.vocabulary_size
        )

    def _factory(self) -> Any:
        module_name, _, function_name = self.spec.factory.partition(":")
        try:
            with _importable_from_cwd():
                module = importlib.import_module(module_name)
        except Exception as error:  # ImportError, or whatever the module raises on import
            raise ValueError(
                f"model.factory: {self.spec.factory!r} does not import "
                f"({type(error).__name__}: {error}). To fix: make {module_name} importable "
                f"on every node (installed, or on PYTHONPATH; sys.path starts {sys.path[:2]})."
            ) from None
        factory = getattr(module, function_name, None)
        if not callable(factory):
            raise ValueError(
                f"model.factory: {module_name} has no function {function_name!r}. To fix: name "
                "a function that returns an nn.Module."
            )
        return factory

    def _module(self, seed: int) -> nn.Module:
        factory = self._factory()
        with seeded(seed):
            module = factory(
                vocabulary_size=self.spec.vocabulary_size,
                sequence_length=self.spec.sequence_length,
                **self.spec.options,
            )
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"model.factory: {self.spec.factory} returned a {type(module).__name__}, not a "
                "torch.nn.Module. To fix: return the model."
            )
        return module

    def _meta_module(self) -> nn.Module:
        with torch.device("meta"):
            return self._module(seed=0)

    @staticmethod
    def _pieces(module: nn.Module) -> list[nn.Module]:
        """An nn.Sequential's children (input piece, blocks, output piece); [] otherwise."""
        if isinstance(module, nn.Sequential) and len(module) >= 3:
            return list(module)
        return []


@contextmanager
def _importable_from_cwd() -> Iterator[None]:
    """Modules in the folder Shipyard runs from import, as with `python -m` (Ray workers
    started by Shipyard get the same folder on their PYTHONPATH)."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.append(here)
    try:
        yield
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


class _Logits(nn.Module):
    """The factory's module, returning logits whatever it returns."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return logits_of(self.module(tokens))
