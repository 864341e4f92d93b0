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
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shipyard.models.export_files import save_weights
from shipyard.models.family import (
    PieceStack,
    PipelineLayers,
    piece_seed,
    seeded,
    stack_names,
)
from shipyard.models.huggingface.config import Resolved, resolve
from shipyard.models.huggingface.pieces import (
    ADAPTERS,
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
    sharding_table,
    split_embedding,
    split_linears,
)
from shipyard.models.huggingface.weights import WeightFolder
from shipyard.models.measure import Pieces, measure
from shipyard.models.size import ModelSize
from shipyard.models.tensor_parallel import SINGLE, TensorParallel, mark_sharded, sharding_of
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

    def check(self, train) -> None:
        """The architecture, config and weights, and the layout `train` asks for."""
        config = self.text_config
        if self.vocabulary_size < BYTE_VOCABULARY:
            raise ValueError(
                f"model.config.vocab_size: {self.vocabulary_size} is smaller than the "
                f"tokenizer's {BYTE_VOCABULARY} tokens (bytes). To fix: use a vocabulary of at "
                f"least {BYTE_VOCABULARY}."
            )
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
            self._weights(self._skeleton()).check_covers(self._needed(self._skeleton()))

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
        skeleton = self._skeleton()
        weights = self._weights(skeleton)
        pieces: list[nn.Module] = []
        for index, (piece_class, parts) in enumerate(self._recipes(skeleton)):
            if piece_class is TiedHead:
                pieces.append(TiedHead(pieces[0], tp))
            else:
                pieces.append(self._piece(piece_class, parts, index, seed, tp, skeleton, weights))
        leading = len(self.adapter.embeddings)
        blocks = range(leading, leading + self.layers)
        return PieceStack(pieces, blocks, self.spec.activation_checkpointing)

    def block(self, seed: int) -> nn.Module | None:
        """The first decoder layer as a piece, hidden states in and out (None without a piece
        adapter: the whole model is one module)."""
        if self.adapter is None:
            return None
        skeleton = self._skeleton()
        index = len(self.adapter.embeddings)
        piece_class, parts = self._recipes(skeleton)[index]
        return self._piece(piece_class, parts, index, seed, SINGLE, skeleton, None)

    def pipeline(self, seed: int, tp: TensorParallel = SINGLE) -> PipelineLayers:
        """DeepSpeed pipeline layers: each stage materialises only its own pieces; a tied
        embedding is one TiedLayerSpec on the first and the last stage."""
        from shipyard.models.pipeline_specs import PieceSpec, TiedPieceSpec

        skeleton = self._skeleton()
        weights = self._weights(skeleton)
        recipes = self._recipes(skeleton)

        def maker(index: int):
            piece_class, parts = recipes[index]
            return lambda: self._piece(piece_class, parts, index, seed, tp, skeleton, weights)

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
                head = partial(_tied_head, tp=tp)
                layers.append(tied_embedding(forward_fn=head))
            else:
                layers.append(PieceSpec(maker(index), piece_class))
        return PipelineLayers(layers, len(self.adapter.embeddings), 2, ["DecoderBlock"])

    def export(self, state: dict[str, torch.Tensor], folder: Path) -> list[str]:
        """config.json, generation_config.json and safetensors that transformers loads."""
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
        config.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)
        return files

    def load_module(self, folder: Path, device: str) -> nn.Module:
        """The exported model as transformers loads it, returning logits."""
        return _Whole(self._pretrained(folder).to(device))

    def load_for_serving(self, folder: Path, device: str):
        """The exported model decoding with its own KV cache, stopping at its end token."""
        from transformers import GenerationConfig

        from shipyard.models.generation import CausalLMGenerator

        stop = GenerationConfig.from_pretrained(folder, local_files_only=True).eos_token_id
        if isinstance(stop, list):
            stop = stop[0] if stop else None
        positions = getattr(self.text_config, "max_position_embeddings", None)
        context = positions or self.spec.sequence_length
        model = self._pretrained(folder).to(device)
        return CausalLMGenerator(model, context, uses_cache=True, end_of_sequence=stop)

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

    def _recipes(self, skeleton: nn.Module) -> list[tuple[type, dict[str, Any]]]:
        """Each piece's class and the skeleton modules it holds, in order."""
        adapter = self.adapter
        token_path, *position_paths = adapter.embeddings
        recipes: list[tuple[type, dict[str, Any]]] = [
            (TokenEmbedding, {token_path: skeleton.get_submodule(token_path)})
        ]
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

    def _piece(self, piece_class, parts, index, seed, tp, skeleton, weights) -> Piece:
        """Piece `index`, materialised on this rank with its weights, then split for `tp`."""
        if piece_class is DecoderBlock:
            parts = dict(parts)
            piece = DecoderBlock(parts, parts.pop("rotary"))
        else:
            piece = piece_class(parts)
        piece.to_empty(device=torch.get_default_device())  # meta when only counting
        with torch.no_grad():
            if weights is None:
                with seeded(piece_seed(seed, index)):
                    for module in _children_first(piece):
                        skeleton._init_weights(module)
            else:
                piece.load_state_dict(weights.load(piece.state_dict()), strict=True)
                for module in piece.modules():  # buffers computed, not saved (rotary)
                    if "RotaryEmbedding" in type(module).__name__:
                        skeleton._init_weights(module)
        if tp.active:
            self._split(piece, tp)
        return piece

    def _split(self, piece: Piece, tp: TensorParallel) -> None:
        adapter = self.adapter
        if isinstance(piece, DecoderBlock):
            split_linears(piece.part(), adapter.block_plan, tp, adapter.conv1d)
            if adapter.after_split:
                adapter.after_split(piece.part(), tp.size)
        elif isinstance(piece, TokenEmbedding):
            _replace(piece, piece.paths[0], split_embedding(piece.part(), tp))
        elif isinstance(piece, Head):
            _replace(piece, piece.paths[0], VocabularyParallelHead(piece.part(), tp))
        mark_sharded(piece, self.sharding)


class _Whole(nn.Module):
    """A transformers model as one piece: token ids to logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits


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
