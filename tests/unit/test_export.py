"""Safetensors exports: a round trip keeps the weights; a changed file is refused."""

from __future__ import annotations

import pytest
import torch

from shipyard.models.gpt import GPT
from shipyard.serve.export import (
    ExportError,
    load_exported_model,
    read_export,
    write_export,
)
from shipyard.spec.job import ModelSpec

SPEC = ModelSpec(layers=1, heads=2, width=16, sequence_length=16)


def export_of(model: GPT, target):
    return write_export(target, model.state_dict(), SPEC, job_name="tiny", step=7)


def test_round_trip_keeps_every_weight(tmp_path):
    model = GPT(SPEC, seed=3)
    export = export_of(model, tmp_path / "export")
    loaded = load_exported_model(read_export(tmp_path / "export"))
    assert (export.job_name, export.step, export.model) == ("tiny", 7, SPEC)
    for name, weight in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")], "no staging left"


def test_a_changed_weights_file_is_refused(tmp_path):
    export = export_of(GPT(SPEC, seed=3), tmp_path / "export")
    data = bytearray(export.weights.read_bytes())
    data[-1] ^= 0xFF
    export.weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match the manifest"):
        load_exported_model(export)


def test_an_existing_export_is_never_overwritten(tmp_path):
    first = export_of(GPT(SPEC, seed=3), tmp_path / "export")
    second = export_of(GPT(SPEC, seed=4), tmp_path / "export")
    assert second.sha256 == first.sha256


def test_a_folder_without_manifest_is_not_an_export(tmp_path):
    with pytest.raises(ExportError, match="not a Shipyard export folder"):
        read_export(tmp_path)
