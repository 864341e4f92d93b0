"""A checkpoint consolidated into a Hugging Face folder: what `transformers`, vLLM or Ray Serve
LLM open, and what Shipyard's serving replicas load instead of DeepSpeed's pickles.

Whatever the training layout (ZeRO shards, pipeline stages, tensor-parallel shards), the
checkpoint is gathered into one state dict named as the whole model's, and the model's family
writes it as config.json, generation_config.json and safetensors (sharded with an index when
large), beside the run's tokenizer (tokenizer.json and its config; none for bytes). A manifest, shipyard-export.json, records the job, the step, the model spec and every
file's SHA-256; a replica checks the files against it before it loads them.

DeepSpeed's files are pickles. They are read with torch's weights-only unpickler (tensors,
plain containers and the few DeepSpeed classes `weights_only_loads` names), so a checkpoint
from someone else cannot run code here: at worst it holds wrong weights.
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
from pydantic import TypeAdapter
from safetensors import SafetensorError

from shipyard.data.tokenizer import BYTES, Tokenizer, saved_tokenizer
from shipyard.errors import ShipyardError
from shipyard.models import model_family
from shipyard.models.tensor_parallel import join_shards
from shipyard.spec.model import ModelSpec
from shipyard.train.checkpoint import (
    CHECKPOINT_TAG,
    TOKENIZER_FOLDER,
    SavedCheckpoint,
    weights_only_loads,
)

# Exports live beside a run's checkpoints, never inside one: Ray prunes checkpoint folders.
EXPORTS_FOLDER = "exports"
MANIFEST_FILE = "shipyard-export.json"
_PIPELINE_LAYER_FILE = re.compile(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt")
_MODEL_SPEC = TypeAdapter(ModelSpec)


class ExportError(ShipyardError):
    """A checkpoint cannot be exported, or an export is incomplete or corrupt."""


@dataclass(frozen=True)
class ExportedModel:
    """A consolidated model on disk: what it is, and its files with their SHA-256."""

    folder: Path
    job_name: str
    step: int
    model: Any  # the job's model spec
    files: dict[str, str]  # weight (and index) file -> SHA-256

    @property
    def sha256(self) -> str:
        """One digest of all the weight files (the export's identity)."""
        lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(self.files.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

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

    `checkpoint` must be on this machine (`local_copy` downloads one from S3). The export is
    made here, from DeepSpeed's files, in `exports/` beside the checkpoint folder (which Ray
    prunes, even under a running deployment), named by the checkpoint's identity.
    """
    target = export_folder(checkpoint)
    if (target / MANIFEST_FILE).is_file():
        return read_export(target)
    spec = _MODEL_SPEC.validate_python(checkpoint.job["model"])
    with weights_only_loads(checkpoint.path):
        state = consolidated_state_dict(checkpoint, spec)
    tokenizer = saved_tokenizer(Path(checkpoint.path) / TOKENIZER_FOLDER)
    return write_export(target, state, spec, checkpoint.job["name"], checkpoint.step, tokenizer)


def export_folder(checkpoint: SavedCheckpoint) -> Path:
    """Where `checkpoint`'s export goes: named by its step and a digest of its location and
    metadata, so two sweep trials' `checkpoint_000003` (or a re-trained job's) never share one."""
    folder = Path(checkpoint.path)
    identity = json.dumps(
        [str(folder.resolve()), checkpoint.job, checkpoint.plan, checkpoint.metrics],
        sort_keys=True,
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return folder.parent / EXPORTS_FOLDER / f"{folder.name}-{digest}"


def write_export(
    target: Path,
    state: dict[str, torch.Tensor],
    spec: Any,
    job_name: str,
    step: int,
    tokenizer: Tokenizer = BYTES,
) -> ExportedModel:
    """The family writes the folder in a staging folder beside `target`; the manifest goes last
    and the folder is renamed into place, so a crash never leaves a half-written export that
    looks complete. If `target` appears meanwhile (another process exported the same
    checkpoint), theirs is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        files = model_family(spec).export(state, staging, tokenizer.end_of_text)
        files += tokenizer.save(staging, spec.sequence_length)
        manifest = {
            "job": job_name,
            "step": step,
            "model": spec.model_dump(mode="json"),
            "files": {name: _sha256(staging / name) for name in files},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        os.rename(staging, target)
    except (OSError, SafetensorError) as error:  # a full disk, say (safetensors: its own)
        if not (target / MANIFEST_FILE).is_file():  # else another process's export is there
            reason = getattr(error, "strerror", None) or str(error).rsplit(": ", 1)[-1]
            raise ExportError(
                f"{target}: the export could not be written ({reason}); "
                "nothing of it was kept and the checkpoint is as it was. To fix: free space "
                f"(or rights) in {target.parent}, then export again."
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_export(target)


def read_export(folder: str | os.PathLike[str]) -> ExportedModel:
    """The manifest of an export folder (the files are checked when they are loaded)."""
    manifest_file = Path(folder) / MANIFEST_FILE
    if not manifest_file.is_file():
        raise ExportError(f"{folder}: no {MANIFEST_FILE}; this is not a Shipyard export folder.")
    manifest = json.loads(manifest_file.read_text())
    return ExportedModel(
        folder=Path(folder),
        job_name=manifest["job"],
        step=int(manifest["step"]),
        model=_MODEL_SPEC.validate_python(manifest["model"]),
        files=dict(manifest["files"]),
    )


def verify(export: ExportedModel) -> None:
    """Raise ExportError unless every weight file matches the manifest's SHA-256."""
    for name, expected in export.files.items():
        path = export.folder / name
        digest = _sha256(path) if path.is_file() else "missing"
        if digest != expected:
            raise ExportError(
                f"{path}: SHA-256 {digest[:12]}… does not match the manifest's {expected[:12]}…; "
                f"the file is corrupt or was replaced. To fix: delete {export.folder} and serve "
                "again to re-export it."
            )


def load_exported_model(export: ExportedModel, device: str = "cpu") -> torch.nn.Module:
    """The exported model (token ids to logits), after checking its files."""
    verify(export)
    return model_family(export.model).load_module(export.folder, device).eval()


def load_generator(export: ExportedModel, device: str = "cpu"):
    """What a replica decodes with, after checking the export's files."""
    verify(export)
    return model_family(export.model).load_for_serving(export.folder, device)


def consolidated_state_dict(checkpoint: SavedCheckpoint, spec: Any) -> dict[str, torch.Tensor]:
    """Full fp32 weights named as the whole model's state dict, from any training layout."""
    folder = Path(checkpoint.path) / CHECKPOINT_TAG
    if not folder.is_dir():
        raise ExportError(f"{checkpoint.path}: no {CHECKPOINT_TAG}/ folder; not a checkpoint.")
    sharding = model_family(spec).sharding
    tensor_parallel = checkpoint.plan.get("tensor_parallel", 1)
    if checkpoint.plan["pipeline_stages"] > 1:
        state = _from_pipeline_layers(folder, sharding)
    elif checkpoint.plan["zero_stage"] == 0 or tensor_parallel > 1:
        # Below ZeRO-3 every tensor-parallel rank's file holds its whole share of the model.
        # (Under bf16 that is the bf16 copy; ZeRO's fp32 master is not consolidated per shard.)
        state = join_shards(
            [
                _torch_load(folder / f"mp_rank_{rank:02d}_model_states.pt")["module"]
                for rank in range(tensor_parallel)
            ],
            sharding,
        )
    else:
        state = _from_zero_partitions(Path(checkpoint.path))
    return {name: tensor.detach().float().contiguous() for name, tensor in state.items()}


def _from_pipeline_layers(folder: Path, sharding) -> dict[str, torch.Tensor]:
    """Pipeline stages save one file per layer and tensor-parallel rank, numbered as the whole
    model's layers are."""
    by_rank: dict[int, dict[str, torch.Tensor]] = {}
    for file in sorted(folder.iterdir()):
        match = _PIPELINE_LAYER_FILE.fullmatch(file.name)
        if match:
            rank = int(match.group(2) or 0)
            for name, tensor in _torch_load(file).items():
                by_rank.setdefault(rank, {})[f"layers.{int(match.group(1))}.{name}"] = tensor
    return join_shards([by_rank[rank] for rank in sorted(by_rank)], sharding)


def _from_zero_partitions(checkpoint_folder: Path) -> dict[str, torch.Tensor]:
    """ZeRO 1-3: gather every rank's partition of the fp32 master weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # progress lines
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_folder), tag=CHECKPOINT_TAG)


def _torch_load(file: Path) -> Any:
    return torch.load(file, map_location="cpu", weights_only=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
