"""What Shipyard reads from storage it may not control: checkpoints, their metadata, caches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from shipyard.cli import main
from shipyard.plan.profile import DeviceProfile, load_profiles, save_profile
from shipyard.serve.export import export_folder
from shipyard.storage import StorageError
from shipyard.train.checkpoint import (
    METADATA_FILE,
    RAY_CHECKPOINT_SNAPSHOT,
    CheckpointError,
    SavedCheckpoint,
    read_checkpoint,
    saved_checkpoints,
    weights_only_loads,
)


class WritesAFile:
    """A pickle that runs code when it is loaded: it leaves a file behind."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "ran"))


def test_deepspeeds_full_unpickling_is_refused_inside_weights_only_loads(tmp_path):
    hostile, fine = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "fine.pt"
    torch.save({"module": {"w": torch.ones(2)}, "trap": WritesAFile(tmp_path / "ran")}, hostile)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, fine)
    refused = pytest.raises(CheckpointError, match=r"ckpt: a checkpoint file holds .*Unsupported")
    with refused, weights_only_loads("ckpt"):
        torch.load(hostile, weights_only=False)  # as DeepSpeed's own loaders ask
    assert not (tmp_path / "ran").exists(), "the pickle's code must not have run"
    with weights_only_loads("ckpt"):
        assert torch.load(fine, weights_only=False)["module"]["w"].sum() == 2
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ, "the switch is put back"


def test_deepspeeds_own_pickled_classes_still_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    file = tmp_path / "optim_states.pt"
    scaler = DynamicLossScaler(2.0**16, 1000, 1.0, 2, consecutive_hysteresis=False)
    torch.save({"loss_scaler": scaler, "zero_stage": ZeroStageEnum.gradients}, file)
    with weights_only_loads("ckpt"):
        loaded = torch.load(file, weights_only=False)
    assert loaded["zero_stage"] == ZeroStageEnum.gradients
    assert loaded["loss_scaler"].cur_scale == 2.0**16


def write_checkpoint(folder: Path, metadata: str) -> Path:
    folder.mkdir(parents=True)
    (folder / METADATA_FILE).write_text(metadata)
    return folder


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ('{"job": {"name": "j"}, "plan": ', "not valid JSON (line 1"),
        ("[1, 2]", "expected a JSON object, not list"),
        ('{"job": {"name": "j"}, "plan": {}}', "not a Shipyard checkpoint's metadata"),
        ('{"job": 3, "plan": {}, "metrics": {"step": 1}}', "not a Shipyard checkpoint's"),
    ],
)
def test_corrupt_checkpoint_metadata_is_a_clear_error(tmp_path, metadata, message):
    folder = write_checkpoint(tmp_path / "checkpoint_1", metadata)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(folder)
    assert f"checkpoint_1/{METADATA_FILE}: {message}" in str(error.value)


def test_a_registry_naming_folders_outside_the_run_is_refused(tmp_path):
    write_checkpoint(tmp_path / "outside", '{"job": {}, "plan": {}, "metrics": {"step": 1}}')
    (tmp_path / "j").mkdir()
    results = {"checkpoint_results": [{"checkpoint_dir_name": "../outside"}]}
    (tmp_path / "j" / RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps(results))
    with pytest.raises(StorageError, match=r"'\.\./outside' is not a relative path"):
        saved_checkpoints(str(tmp_path), "j")
    (tmp_path / "j" / RAY_CHECKPOINT_SNAPSHOT).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{RAY_CHECKPOINT_SNAPSHOT}: not valid JSON"):
        saved_checkpoints(str(tmp_path), "j")


def test_an_export_lives_beside_its_checkpoint_and_is_named_by_it(tmp_path):
    """Ray prunes checkpoint folders (a served export inside one would vanish), and two sweep
    trials each have a checkpoint_000003."""

    def checkpoint(run: str, loss: float) -> SavedCheckpoint:
        path = tmp_path / run / "checkpoint_000003"
        return SavedCheckpoint(str(path), 3, {"name": run}, {}, {"step": 3, "loss": loss})

    first, second = checkpoint("trial-a", 2.0), checkpoint("trial-b", 2.0)
    assert export_folder(first).parent == tmp_path / "trial-a" / "exports"
    assert not export_folder(first).is_relative_to(first.path)
    assert export_folder(first) != export_folder(second).parent / export_folder(first).name
    retrained = checkpoint("trial-a", 1.5)  # the same folder name after a re-run
    assert export_folder(retrained) != export_folder(first)
    assert export_folder(checkpoint("trial-a", 2.0)) == export_folder(first)


def profile(overhead: dict) -> DeviceProfile:
    return DeviceProfile("CPU", 2, "fp32", "gpt-w32-p1-s32", 0.5, 100.0, {1: 0.01}, overhead)


def test_a_corrupt_profile_is_ignored_with_a_warning_and_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path))
    path = save_profile(profile({"1": {"step": 0.1}}))
    path.write_text('{"device": "CPU", "thre')  # a crash mid-write, as the old code allowed
    job = type("Job", (), {"model": None})  # load_profiles needs only the block shape
    monkeypatch.setattr("shipyard.plan.profile.block_shape", lambda job: "gpt-w32-p1-s32")
    assert load_profiles(job) == {}
    assert f"Warning: {path}: not a device profile" in capsys.readouterr().err
    save_profile(profile({"2": {"step": 0.2}}))
    assert load_profiles(job)[profile({}).key].engine_overhead == {"2": {"step": 0.2}}
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left"


@pytest.mark.parametrize("step", ["0", "-3", "ten"])
def test_stop_at_step_must_be_a_step(step, capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["train", "jobs/tiny-llama.yaml", "--stop-at-step", step])
    assert exit_code.value.code == 2
    assert f"--stop-at-step: {step!r} is not a step" in capsys.readouterr().err
