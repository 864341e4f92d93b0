"""The `model:` section of a job: one of three families, chosen by `type`.

    type: gpt          Shipyard's built-in GPT, built from a few numbers (the default)
    type: huggingface  a `transformers` causal LM: an architecture and config, or a folder
    type: python       your own `nn.Module`, returned by `factory: package.module:function`

These classes check what can be checked from the YAML alone. What needs `transformers`, a
model folder or an import (does the architecture exist, does the folder hold safetensors, does
the factory import) is checked by the model family when the job is loaded
(`shipyard.models.check_model`), before Ray starts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BYTE_VOCABULARY = 256  # the corpus is tokenized as raw bytes


class Strict(BaseModel):
    """Base for spec sections: unknown keys are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GptModelSpec(Strict):
    """A decoder-only transformer (GPT) built from these numbers; no weights are downloaded."""

    type: Literal["gpt"] = "gpt"
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    width: int = Field(128, ge=8)
    sequence_length: int = Field(128, ge=8)
    vocabulary_size: int = Field(BYTE_VOCABULARY, ge=BYTE_VOCABULARY)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GptModelSpec:
        if self.width % self.heads:
            raise ValueError(
                f"model.heads: {self.heads} does not divide model.width {self.width}. "
                f"To fix: pick heads from {divisors(self.width)}, or change the width."
            )
        return self


class HuggingFaceModelSpec(Strict):
    """A `transformers` causal language model, never with code from the model folder.

    Either `architecture` (a transformers model type such as llama or gpt2) with `config`
    fields, built with random weights; or `path`, a folder or s3:// prefix holding config.json
    and safetensors weights, to fine-tune (`config` then overrides fields of its config.json,
    such as dropout).
    """

    type: Literal["huggingface"]
    architecture: str | None = Field(None, min_length=1)
    path: str | None = Field(None, min_length=1)
    config: dict[str, Any] = Field(default_factory=dict)
    sequence_length: int = Field(128, ge=8, description="tokens per training window")
    activation_checkpointing: bool = False
    trust_remote_code: bool = False

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "model.trust_remote_code: true is not allowed; Shipyard never runs Python code "
                "shipped inside a model folder or hub repository. To fix: remove it, and use "
                "an architecture transformers ships (or type: python with your own factory)."
            )
        return value

    @model_validator(mode="after")
    def _architecture_or_path(self) -> HuggingFaceModelSpec:
        if self.architecture is None and self.path is None:
            raise ValueError(
                "model.architecture: a huggingface model needs an architecture (random "
                "weights from config) or a path (a folder or s3:// prefix with config.json and "
                "safetensors weights). To fix: add one, e.g. architecture: llama."
            )
        return self


class PythonModelSpec(Strict):
    """Your own PyTorch module: `factory` names a function returning an `nn.Module`.

    The function is called as `factory(vocabulary_size=…, sequence_length=…, **options)` with
    torch's generator seeded from train.seed, and the module maps token ids (batch, sequence)
    to logits (batch, sequence, vocabulary_size). Return an `nn.Sequential` (input piece,
    blocks, output piece) to allow pipeline parallelism and activation checkpointing; see
    docs/models.md.
    """

    type: Literal["python"]
    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    options: dict[str, Any] = Field(default_factory=dict)
    vocabulary_size: int = Field(BYTE_VOCABULARY, ge=BYTE_VOCABULARY)
    sequence_length: int = Field(128, ge=8)
    activation_checkpointing: bool = False


ModelSpec = Annotated[
    GptModelSpec | HuggingFaceModelSpec | PythonModelSpec, Field(discriminator="type")
]
MODEL_TYPES = ("gpt", "huggingface", "python")


def with_default_type(document: Any) -> Any:
    """A `model:` mapping without `type` is the built-in GPT (job specs written before the
    other families keep working)."""
    if isinstance(document, dict) and "type" not in document:
        return {"type": "gpt", **document}
    return document


def divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]
