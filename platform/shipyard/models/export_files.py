"""Writing weights as a Hugging Face folder does: safetensors, sharded with an index when large."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' own default shard size


def save_weights(
    state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[str]:
    """Write `state` into `folder` as model.safetensors, or as numbered shards and an index
    when it is bigger than `max_shard_bytes`; returns the files written, index last."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], folder / WEIGHTS_FILE, metadata=metadata)
        return [WEIGHTS_FILE]
    files, weight_map = [], {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata=metadata)
        files.append(name)
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
    return [*files, WEIGHTS_INDEX]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors weights (one file, or the shards its index
    lists)."""
    from safetensors.torch import load_file

    index = folder / WEIGHTS_INDEX
    if index.is_file():
        files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
    else:
        files = {WEIGHTS_FILE: None}
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors |= load_file(folder / file)
    return tensors
