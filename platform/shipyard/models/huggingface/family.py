"""Hugging Face causal language models as a Shipyard model family.

Llama and GPT-2 (see `pieces.ADAPTERS`) are built as pieces: every layout works, pipelines and
tensor parallelism included. Any other causal LM architecture transformers ships trains whole
(data parallel, ZeRO 0-3, offload, activation checkpointing through transformers' own
gradient checkpointing); asking it for pipeline stages or tensor-parallel shards is refused with
that reason.

Weights come from the job's seed (each piece drawing from its own seed, with the architecture's
own initialisation) or from `path`: each rank builds its pieces on the meta device, then
materialises and fills only those it holds.
"""

from __future__ import annotations

import copy
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shipyard.models.export_files import save_weights
from shipyard.models.family import (
    PieceStack,
    PipelineLayers,
    seeded,
    stack_names,
)
from shipyard.models.family import (
    check_vocabulary as _check_vocabulary,
)
from shipyard.models.huggingface.building import PieceBuilder
from shipyard.models.huggingface.config import Resolved, resolve
from shipyard.models.huggingface.pieces import ADAPTERS, Adapter
from shipyard.models.huggingface.tensor_parallel import sharding_table
from shipyard.models.huggingface.weights import WeightFolder
from shipyard.models.measure import Pieces, measure
from shipyard.models.size import ModelSize
from shipyard.models.tensor_parallel import SINGLE, TensorParallel, sharding_of
from shipyard.spec.model import BYTE_VOCABULARY, HuggingFaceModelSpec, divisors

ATTENTION = "sdpa"  # causal without a mask, fused where the device has a kernel


class HuggingFaceFamily:
    """A transformers causal LM, from config (random weights) or from a folder."""

    def __init__(self, spec: HuggingFaceModelSpec):
        self.spec = spec

    @cached_property
    def resolved(self) -> Resolved:
        return resolve(self.spec)

    @property
    def config(self) -> Any:
        return self.resolved.config

    @property
    def text_config(self) -> Any:
        return self.config.get_text_config()

    @property
    def adapter(self) -> Adapter | None:
        return ADAPTERS.get(self.config.model_type)

    @property
    def layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def vocabulary_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def tied(self) -> bool:
        return bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def sharding(self) -> dict[str, tuple[int, int]]:
        adapter = self.adapter
        if adapter is None:
            return {}
        return sharding_table(
            adapter.block_plan, adapter.conv1d, (adapter.embeddings[0], "lm_head")
        )

    def check(self, train, tokenizer_vocabulary: int = BYTE_VOCABULARY) -> None:
        """The architecture, config and weights, the tokenizer's vocabulary, and the layout
        `train` asks for."""
        config = self.text_config
        _check_vocabulary("model.config.vocab_size", self.vocabulary_size, tokenizer_vocabulary)
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and self.spec.sequence_length > positions:
            raise ValueError(
                f"model.sequence_length: {self.spec.sequence_length} is longer than the "
                f"model's max_position_embeddings {positions}. To fix: use at most {positions}."
            )
        problem = self.layout_problem(train.pipeline_stages, train.tensor_parallel)
        if problem:
            raise ValueError(problem)
        if self.spec.activation_checkpointing and self.adapter is None:
            model_class = self._model_class()
            if not getattr(model_class, "supports_gradient_checkpointing", False):
                raise ValueError(
                    f"model.activation_checkpointing: {model_class.__name__} does not support "
                    "gradient checkpointing. To fix: set activation_checkpointing: false."
                )
        if self.resolved.folder is not None:
            skeleton = self._skeleton()
            self._weights(skeleton).check_covers(self._needed(skeleton))

    def layout_problem(self, pipeline_stages: int, tensor_parallel: int) -> str | None:
        """Why the model cannot be cut into these stages and shards (None if it can)."""
        kind = self.config.model_type
        if self.adapter is None and (pipeline_stages > 1 or tensor_parallel > 1):
            field = "pipeline_stages" if pipeline_stages > 1 else "tensor_parallel"
            return (
                f"train.{field}: Shipyard splits {' and '.join(sorted(ADAPTERS))} models into "
                f"pipeline stages and tensor-parallel shards; {kind} trains whole (data "
                f"parallel with ZeRO 0-3). To fix: set train.pipeline_stages and "
                "train.tensor_parallel to 1, or use one of those architectures."
            )
        if pipeline_stages > self.layers:
            return (
                f"train.pipeline_stages: {pipeline_stages} is more than the model's "
                f"{self.layers} layers; every stage needs at least one. To fix: use at most "
                f"{self.layers} stages."
            )
        if tensor_parallel > 1:
            config = self.text_config
            counts = {
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": getattr(config, "num_key_value_heads", None),
                "intermediate_size": getattr(config, "intermediate_size", None),
                "vocab_size": config.vocab_size,
            }
            for name, value in counts.items():
                if value and value % tensor_parallel:
                    return (
                        f"train.tensor_parallel: {tensor_parallel} does not divide the model's "
                        f"{name} {value}; each rank holds an equal share of it. To fix: use a "
                        f"tensor_parallel from {divisors(value)}."
                    )
        return None

    def tensor_parallel_widths(self) -> tuple[int, ...]:
        """Widths the planner may try: those every split dimension divides."""
        heads = self.text_config.num_attention_heads
        return tuple(t for t in divisors(heads) if self.layout_problem(1, t) is None)

    def size(self) -> ModelSize:
        """Parameters, FLOPs and activations measured on the meta device (see measure.py)."""
        model = self._skeleton(torch.bfloat16)
        adapter = self.adapter
        if adapter:
            inputs = [model.get_submodule(path) for path in adapter.embeddings]
            blocks = list(model.get_submodule(adapter.layers))
        else:
            inputs = [model.get_input_embeddings()]
            block_classes = set(getattr(model, "_no_split_modules", None) or ())
            blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
        sharding = self.sharding
        return measure(
            Pieces(model, inputs, blocks, lambda t: model(input_ids=t, use_cache=True).logits),
            width=self.text_config.hidden_size,
            sequence_length=self.spec.sequence_length,
            vocabulary_size=self.vocabulary_size,
            split=lambda name: sharding_of(name, sharding) is not None,
        )

    def build(self, seed: int, tp: TensorParallel = SINGLE) -> nn.Module:
        """The whole model on this rank, as pieces (or the transformers model itself)."""
        if self.adapter is None:
            return PieceStack([_Whole(self._whole_model(seed))], range(0), False)
        return self._builder(seed, tp).whole(self.spec.activation_checkpointing)

    def block(self, seed: int) -> nn.Module | None:
        """The first decoder layer as a piece, hidden states in and out (None without a piece
        adapter: the whole model is one module)."""
        if self.adapter is None:
            return None
        builder = self._builder(seed, SINGLE, with_weights=False)
        index = builder.leading
        return builder.piece(index, *builder.recipes()[index])

    def pipeline(self, seed: int, tp: TensorParallel = SINGLE) -> PipelineLayers:
        """DeepSpeed pipeline layers, each stage materialising only its own pieces."""
        return self._builder(seed, tp).pipeline()

    def export(
        self, state: dict[str, torch.Tensor], folder: Path, end_of_text: int | None = None
    ) -> list[str]:
        """config.json, generation_config.json and safetensors that transformers loads; a
        config without an end token gets the tokenizer's."""
        from transformers import GenerationConfig

        names = stack_names(state)
        if self.adapter is None:
            names = {name.removeprefix("model."): tensor for name, tensor in names.items()}
        if self.tied:
            names.pop("lm_head.weight", None)
        files = save_weights(names, folder)
        config = copy.deepcopy(self.config)
        config.architectures = [self._model_class().__name__]
        config.dtype = "float32"
        if end_of_text is not None and getattr(config, "eos_token_id", None) is None:
            config.eos_token_id = end_of_text
        config.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)
        return [*files, "config.json", "generation_config.json"]

    def load_module(self, folder: Path, device: str) -> nn.Module:
        """The exported model as transformers loads it, returning logits."""
        return _Whole(self._pretrained(folder).to(device))

    def load_for_serving(self, folder: Path, device: str):
        """The exported model decoding with its own KV cache over its tokenizer's ids, stopping
        at the end token (the tokenizer's, else the generation config's)."""
        from transformers import GenerationConfig

        from shipyard.data.tokenizer import saved_tokenizer
        from shipyard.models.generation import CausalLMGenerator

        tokenizer = saved_tokenizer(folder)
        stop = tokenizer.end_of_text
        if stop is None:
            stop = GenerationConfig.from_pretrained(folder, local_files_only=True).eos_token_id
        if isinstance(stop, list):
            stop = stop[0] if stop else None
        positions = getattr(self.text_config, "max_position_embeddings", None)
        context = positions or self.spec.sequence_length
        model = self._pretrained(folder).to(device)
        return CausalLMGenerator(model, context, True, stop, tokenizer.vocabulary_size)

    @staticmethod
    def _pretrained(folder: Path) -> nn.Module:
        """transformers' own loading of a folder: safetensors only, never remote code."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=torch.float32,
        ).eval()

    # Building.

    def _model_class(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM._model_mapping[type(self.config)]

    def _skeleton(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The whole model on the meta device: shapes and structure, no memory."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # a copy: transformers writes dtype and attention into it
            return AutoModelForCausalLM.from_config(
                copy.deepcopy(self.config), attn_implementation=ATTENTION, dtype=dtype
            )

    def _builder(self, seed: int, tp: TensorParallel, with_weights: bool = True) -> PieceBuilder:
        skeleton = self._skeleton()
        weights = self._weights(skeleton) if with_weights else None
        return PieceBuilder(self.adapter, skeleton, weights, seed, tp, self.tied, self.sharding)

    def _weights(self, skeleton: nn.Module) -> WeightFolder | None:
        resolved = self.resolved
        if resolved.folder is None:
            return None
        return WeightFolder(resolved.folder, resolved.weight_files, skeleton, self.spec.path)

    def _needed(self, skeleton: nn.Module) -> dict[str, tuple[int, ...]]:
        state = skeleton.state_dict()
        if self.tied:
            state.pop("lm_head.weight", None)
        return {name: tuple(tensor.shape) for name, tensor in state.items()}

    def _whole_model(self, seed: int) -> nn.Module:
        """A transformers model without a piece adapter, built whole on this rank."""
        from transformers import AutoModelForCausalLM

        if self.resolved.folder is None:
            with seeded(seed):
                model = AutoModelForCausalLM.from_config(copy.deepcopy(self.config))
        else:
            model = AutoModelForCausalLM.from_pretrained(
                self.resolved.folder,
                config=copy.deepcopy(self.config),
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
                dtype=torch.float32,
            ).train()
        if self.spec.activation_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        return model


class _Whole(nn.Module):
    """A transformers model as one piece: token ids to logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits
