"""One safetensors file per checkpoint: what serving replicas load instead of DeepSpeed's pickles.

DeepSpeed's files are pickles (`torch.load(weights_only=False)`): loading one runs whatever code
it holds. The export is made once, by the user who owns the checkpoint, and every replica then
loads only tensors from the safetensors file, checked against the SHA-256 in its manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shipyard.errors import ShipyardError
from shipyard.models.gpt import GPT
from shipyard.models.tensor_parallel import join_shards
from shipyard.spec.job import ModelSpec
from shipyard.train.checkpoint import CHECKPOINT_TAG, SavedCheckpoint

EXPORT_FOLDER = "export"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "model.json"
_PIPELINE_LAYER_FILE = re.compile(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt")


class ExportError(ShipyardError):
    """A checkpoint cannot be exported, or an export is incomplete or corrupt."""


@dataclass(frozen=True)
class ExportedModel:
    """A consolidated model on disk: its weights file and what it is."""

    folder: Path
    job_name: str
    step: int
    model: ModelSpec
    sha256: str

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS_FILE

    def describe(self) -> dict[str, Any]:
        """The public facts about this model, as `GET /v1/model` returns them."""
        return {
            "job": self.job_name,
            "step": self.step,
            "model": self.model.model_dump(mode="json"),
            "sha256": self.sha256,
        }


def export_checkpoint(checkpoint: SavedCheckpoint) -> ExportedModel:
    """The checkpoint's export, consolidating its shards the first time it is asked for.

    The export is written into a temporary folder and renamed into place, so a crash never
    leaves a half-written export that looks complete. `checkpoint` must be on this machine
    (`local_copy` downloads one from S3).
    """
    target = Path(checkpoint.path) / EXPORT_FOLDER
    if (target / MANIFEST_FILE).is_file():
        return read_export(target)
    spec = ModelSpec.model_validate(checkpoint.job["model"])
    state = consolidated_state_dict(checkpoint)
    _check_matches_model(state, spec, Path(checkpoint.path))
    return write_export(target, state, spec, checkpoint.job["name"], checkpoint.step)


def write_export(
    target: Path, state: dict[str, torch.Tensor], spec: ModelSpec, job_name: str, step: int
) -> ExportedModel:
    """Write weights and manifest to a temporary folder beside `target`, then rename it into place.

    If `target` appears meanwhile (another process exported the same checkpoint), theirs is kept.
    """
    from safetensors.torch import save

    weights = save(state)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        (staging / WEIGHTS_FILE).write_bytes(weights)
        manifest = {
            "job": job_name,
            "step": step,
            "model": spec.model_dump(mode="json"),
            "sha256": hashlib.sha256(weights).hexdigest(),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        os.rename(staging, target)
    except OSError:
        if not (target / MANIFEST_FILE).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_export(target)


def read_export(folder: str | os.PathLike[str]) -> ExportedModel:
    """The manifest of an export folder (the weights are checked when they are loaded)."""
    manifest_file = Path(folder) / MANIFEST_FILE
    if not manifest_file.is_file():
        raise ExportError(f"{folder}: no {MANIFEST_FILE}; this is not a Shipyard export folder.")
    manifest = json.loads(manifest_file.read_text())
    return ExportedModel(
        folder=Path(folder),
        job_name=manifest["job"],
        step=int(manifest["step"]),
        model=ModelSpec.model_validate(manifest["model"]),
        sha256=manifest["sha256"],
    )


def load_exported_model(export: ExportedModel, device: str = "cpu") -> GPT:
    """The GPT with the exported weights, after checking the file's SHA-256."""
    from safetensors.torch import load

    data = export.weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != export.sha256:
        raise ExportError(
            f"{export.weights}: SHA-256 {digest[:12]}… does not match the manifest's "
            f"{export.sha256[:12]}…; the file is corrupt or was replaced. To fix: delete "
            f"{export.folder} and serve again to re-export it."
        )
    model = GPT(export.model, seed=0)
    model.load_state_dict(load(data))
    return model.to(device).eval()


def consolidated_state_dict(checkpoint: SavedCheckpoint) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the GPT, named as `GPT.state_dict()`, from any training layout."""
    folder = Path(checkpoint.path) / CHECKPOINT_TAG
    if not folder.is_dir():
        raise ExportError(f"{checkpoint.path}: no {CHECKPOINT_TAG}/ folder; not a checkpoint.")
    tensor_parallel = checkpoint.plan.get("tensor_parallel", 1)
    if checkpoint.plan["pipeline_stages"] > 1:
        state = _from_pipeline_layers(folder)
    elif checkpoint.plan["zero_stage"] == 0 or tensor_parallel > 1:
        # Below ZeRO-3 every tensor-parallel rank's file holds its whole share of the model.
        # (Under bf16 that is the bf16 copy; ZeRO's fp32 master is not consolidated per shard.)
        state = join_shards(
            [
                _torch_load(folder / f"mp_rank_{rank:02d}_model_states.pt")["module"]
                for rank in range(tensor_parallel)
            ]
        )
    else:
        state = _from_zero_partitions(Path(checkpoint.path))
    return {name: tensor.detach().float().contiguous() for name, tensor in state.items()}


def _from_pipeline_layers(folder: Path) -> dict[str, torch.Tensor]:
    """Pipeline stages save one file per layer and tensor-parallel rank, numbered as the GPT's
    layers are."""
    by_rank: dict[int, dict[str, torch.Tensor]] = {}
    for file in sorted(folder.iterdir()):
        match = _PIPELINE_LAYER_FILE.fullmatch(file.name)
        if match:
            rank = int(match.group(2) or 0)
            for name, tensor in _torch_load(file).items():
                by_rank.setdefault(rank, {})[f"layers.{int(match.group(1))}.{name}"] = tensor
    return join_shards([by_rank[rank] for rank in sorted(by_rank)])


def _from_zero_partitions(checkpoint_folder: Path) -> dict[str, torch.Tensor]:
    """ZeRO 1-3: gather every rank's partition of the fp32 master weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # progress lines
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_folder), tag=CHECKPOINT_TAG)


def _torch_load(file: Path) -> Any:
    # DeepSpeed's checkpoints are pickles; this runs only on the user's own checkpoint, once.
    return torch.load(file, map_location="cpu", weights_only=False)


def _check_matches_model(state: dict[str, torch.Tensor], spec: ModelSpec, source: Path) -> None:
    expected = {
        name: tuple(tensor.shape) for name, tensor in GPT(spec, seed=0).state_dict().items()
    }
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if found != expected:
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        raise ExportError(
            f"{source}: the checkpoint's weights do not fit the model in its shipyard.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}). To fix: serve a checkpoint "
            "written by this version of Shipyard."
        )
