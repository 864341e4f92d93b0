"""Reading a model's weights from a folder's safetensors files, by name, only those asked for.

Safetensors files are memory-mapped, so a pipeline stage reads the tensors of its own layers
and nothing else. Names are matched as transformers matches them: a checkpoint saved from the
base model (GPT-2's `h.0.attn…` for the model's `transformer.h.0.attn…`) has the model's
`base_model_prefix` added, and keys the architecture declares obsolete are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


class WeightFolder:
    """The safetensors weights of one folder, named as the model names its state dict."""

    def __init__(self, folder: Path, files: Iterable[str], model: Any, shown: str):
        from safetensors import safe_open

        self.folder, self.shown = folder, shown
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safe_open(folder / file, framework="pt") as opened:
                for key in opened.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self._file_of[key] = file
                    self._shapes[key] = tuple(opened.get_slice(key).get_shape())
        prefix = getattr(model, "base_model_prefix", "")
        expected = set(model.state_dict())
        ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", [])]
        self._stored_as: dict[str, str] = {}
        for key in self._file_of:
            name = key if key in expected or not prefix else f"{prefix}.{key}"
            if name in expected:
                self._stored_as[name] = key
            elif not any(pattern.search(key) for pattern in ignored):
                raise ValueError(
                    f"model.path: {shown} holds a weight {key!r} that "
                    f"{type(model).__name__} does not have. To fix: check that config.json "
                    "matches the weights (a config override that changes shapes will not do)."
                )

    def check_covers(self, needed: dict[str, tuple[int, ...]]) -> None:
        """Every weight in `needed` (name -> shape) is stored, with that shape."""
        missing = [name for name in needed if name not in self._stored_as]
        if missing:
            raise ValueError(
                f"model.path: {self.shown} lacks {len(missing)} weights the model needs, e.g. "
                f"{', '.join(missing[:3])}. To fix: point path at the complete folder."
            )
        for name, shape in needed.items():
            stored = self._shapes[self._stored_as[name]]
            if stored != shape:
                raise ValueError(
                    f"model.path: {self.shown}: {name} has shape {list(stored)} but the model "
                    f"needs {list(shape)}. To fix: remove config overrides that change sizes."
                )

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors called `names`, read from their files, in fp32."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of[self._stored_as[name]], []).append(name)
        tensors = {}
        for file, wanted in by_file.items():
            with safe_open(self.folder / file, framework="pt") as opened:
                for name in wanted:
                    tensors[name] = opened.get_tensor(self._stored_as[name]).float()
        return tensors
