"""The `data:` and `tokenizer:` sections of a job: what text to train on, and how it becomes
tokens.

    data:
      source: corpus/              # a file, a folder, a glob, or s3://bucket/prefix
      text_field: text             # JSONL records' field holding a document
      text_column: text            # Parquet files' column holding a document
    tokenizer: {train: {vocab_size: 4096}}   # or bytes, or {path: a tokenizer folder}

Files are read by their extension (.txt .md .rst .py: a document per file; .jsonl .json: a
document per line; .parquet: a document per row). What needs the files themselves (do they
exist, does the column) is checked when the corpus is prepared, before training starts.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from shipyard.spec.model import Strict

PYTHON_STDLIB = "python-stdlib"


class DataSpec(Strict):
    """Where the training text comes from and how it is split."""

    source: str = Field(
        PYTHON_STDLIB,
        min_length=1,
        description="'python-stdlib' (this machine's Python standard library source), a file, "
        "a folder, a glob or an s3://bucket/prefix of .txt/.md/.py, .jsonl or .parquet files.",
    )
    text_field: str = Field("text", min_length=1, description="JSONL: the document's field")
    text_column: str = Field("text", min_length=1, description="Parquet: the document column")
    tokens_field: str | None = Field(
        None,
        min_length=1,
        description="pre-tokenized rows: the JSONL field or Parquet column of token ids (the "
        "tokenizer then only says the vocabulary and the end-of-text id)",
    )
    max_bytes: int | None = Field(
        4_000_000, ge=1024, description="python-stdlib only: how much of the library to read"
    )
    validation_fraction: float = Field(0.05, gt=0.0, le=0.5)


class BpeTrainingSpec(Strict):
    """A byte-level BPE trained on the corpus's training documents (the `tokenizers` library)."""

    vocab_size: int = Field(ge=260, le=1_000_000)
    min_frequency: int = Field(2, ge=1)


class TokenizerSpec(Strict):
    """How text becomes tokens: exactly one of bytes, a folder, or training."""

    bytes: bool = False
    path: str | None = Field(
        None, min_length=1, description="a folder or s3:// prefix holding tokenizer.json"
    )
    train: BpeTrainingSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenizerSpec:
        chosen = [name for name in ("bytes", "path", "train") if getattr(self, name)]
        if len(chosen) != 1:
            raise ValueError(
                "tokenizer: give exactly one of bytes, {path: FOLDER} or {train: {vocab_size: "
                f"N}}; got {', '.join(chosen) or 'none'}."
            )
        return self

    @property
    def kind(self) -> str:
        return "bytes" if self.bytes else "folder" if self.path else "train"


def tokenizer_document(value: Any) -> Any:
    """`tokenizer: bytes` is short for `{bytes: true}`; other words are refused by name."""
    if value == "bytes":
        return {"bytes": True}
    if isinstance(value, str):
        raise ValueError(
            f"tokenizer: {value!r} is not allowed; bytes, {{path: FOLDER}} (a tokenizer.json "
            "folder or s3:// prefix) or {train: {vocab_size: N}} is."
        )
    return value
