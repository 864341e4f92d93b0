"""The built-in GPT as a model family: exact sizes from its formulas, its own tensor-parallel
layers, and a Hugging Face GPT-2 folder as its export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shipyard.models.export_files import save_weights
from shipyard.models.family import PipelineLayers, check_vocabulary
from shipyard.models.gpt.huggingface import from_gpt2, gpt2_config, to_gpt2
from shipyard.models.gpt.model import GPT, layer_recipes
from shipyard.models.size import ModelSize
from shipyard.models.tensor_parallel import SHARDING, SINGLE, TensorParallel
from shipyard.spec.model import BYTE_VOCABULARY, GptModelSpec, divisors


class GptFamily:
    """Shipyard's GPT (models/gpt/model.py)."""

    def __init__(self, spec: GptModelSpec):
        self.spec = spec

    @property
    def layers(self) -> int:
        return self.spec.layers

    @property
    def vocabulary_size(self) -> int:
        return self.spec.vocabulary_size

    @property
    def sharding(self) -> dict[str, tuple[int, int]]:
        return SHARDING

    def check(self, train, tokenizer_vocabulary: int = BYTE_VOCABULARY) -> None:
        """The spec's own validators checked the layout; the tokenizer is checked here."""
        check_vocabulary("model.vocabulary_size", self.vocabulary_size, tokenizer_vocabulary)

    def layout_problem(self, pipeline_stages: int, tensor_parallel: int) -> str | None:
        if pipeline_stages > self.spec.layers:
            return f"{self.spec.layers} layers cannot fill {pipeline_stages} pipeline stages"
        for name in ("heads", "vocabulary_size"):
            value = getattr(self.spec, name)
            if value % tensor_parallel:
                return f"tensor parallel {tensor_parallel} does not divide model.{name} {value}"
        return None

    def tensor_parallel_widths(self) -> tuple[int, ...]:
        return tuple(t for t in divisors(self.spec.heads) if self.spec.vocabulary_size % t == 0)

    def size(self) -> ModelSize:
        """Exact parameter counts of models/gpt/model.py, and FLOPs and activations by
        formula (Korthikanti et al. 2022, fused attention)."""
        spec = self.spec
        h, vocabulary, length = spec.width, spec.vocabulary_size, spec.sequence_length
        block = 12 * h * h + 13 * h  # two layer norms, qkv, attention out, MLP in (4h) and out
        return ModelSize(
            embedding=vocabulary * h + length * h,
            block=block,
            head=2 * h + vocabulary * h,  # final norm and the untied, bias-free logits
            layers=spec.layers,
            width=h,
            sequence_length=length,
            vocabulary_size=vocabulary,
            block_flops=2 * block + 4 * length * h,
            head_flops=2 * h * vocabulary,
            block_activation=34 * h,
            embedding_split=vocabulary * h,
            block_split=12 * h * h + 7 * h,  # the row-parallel biases and the norms stay whole
            head_split=vocabulary * h,
        )

    def build(self, seed: int, tp: TensorParallel = SINGLE) -> nn.Module:
        return GPT(self.spec, seed, tp)

    def block(self, seed: int) -> nn.Module:
        """One block, hidden states in and out (what `shipyard plan --profile` times)."""
        from shipyard.models.gpt.model import Block

        return Block(self.spec, seed)

    def pipeline(self, seed: int, tp: TensorParallel = SINGLE) -> PipelineLayers:
        from deepspeed.runtime.pipe import LayerSpec

        layers = [LayerSpec(cls, *args) for cls, *args in layer_recipes(self.spec, seed, tp)]
        return PipelineLayers(layers, leading=1, trailing=1, checkpointable=["Block"])

    def export(
        self, state: dict[str, torch.Tensor], folder: Path, end_of_text: int | None = None
    ) -> list[str]:
        """A GPT-2 folder (see huggingface.py) that transformers loads as GPT2LMHeadModel."""
        from transformers import GenerationConfig

        files = save_weights(to_gpt2(state, self.spec), folder)
        config = gpt2_config(self.spec, end_of_text)
        config.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)
        return [*files, "config.json", "generation_config.json"]

    def load_module(self, folder: Path, device: str) -> GPT:
        """The GPT with an export's (GPT-2 named) weights."""
        from shipyard.models.export_files import load_weights

        model = GPT(self.spec, seed=0)
        model.load_state_dict(from_gpt2(load_weights(folder), self.spec))
        return model.to(device)

    def load_for_serving(self, folder: Path, device: str):
        """The batch-invariant KV-cache generator of models/gpt/generation.py, over the
        export's tokenizer's ids."""
        from shipyard.data.tokenizer import saved_tokenizer
        from shipyard.models.gpt.generation import TextGenerator

        tokenizer = saved_tokenizer(folder)
        model = self.load_module(folder, device)
        length = self.spec.sequence_length
        return TextGenerator(model, length, tokenizer.vocabulary_size, tokenizer.end_of_text)
