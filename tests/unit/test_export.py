"""Exports are Hugging Face folders: transformers opens them with no custom code and computes
the logits Shipyard does; a changed file is refused; an export is never overwritten."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from shipyard.models.export_files import save_weights
from shipyard.models.gpt import GPT
from shipyard.serve.export import ExportError, load_exported_model, read_export, write_export
from shipyard.spec.model import GptModelSpec

SPEC = GptModelSpec(layers=2, heads=2, width=16, sequence_length=16, dropout=0.1)
TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def export_of(model: GPT, target):
    return write_export(target, model.state_dict(), SPEC, job_name="tiny", step=7)


def test_the_gpt_exports_as_a_gpt2_that_transformers_opens(tmp_path):
    model = GPT(SPEC, seed=3).eval()
    export = export_of(model, tmp_path / "export")
    assert (export.job_name, export.step, export.model) == ("tiny", 7, SPEC)
    opened = AutoModelForCausalLM.from_pretrained(export.folder, local_files_only=True).eval()
    assert type(opened).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        torch.testing.assert_close(opened(TOKENS).logits, model(TOKENS), atol=1e-5, rtol=1e-5)
    back = load_exported_model(read_export(tmp_path / "export"))
    for name, weight in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], weight), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")], "no staging left"


def test_a_changed_weights_file_is_refused(tmp_path):
    export = export_of(GPT(SPEC, seed=3), tmp_path / "export")
    weights = export.folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match the manifest"):
        load_exported_model(export)


def test_an_existing_export_is_never_overwritten(tmp_path):
    first = export_of(GPT(SPEC, seed=3), tmp_path / "export")
    second = export_of(GPT(SPEC, seed=4), tmp_path / "export")
    assert second.sha256 == first.sha256


def test_a_folder_without_manifest_is_not_an_export(tmp_path):
    with pytest.raises(ExportError, match="not a Shipyard export folder"):
        read_export(tmp_path)


def test_big_weights_are_sharded_with_an_index_transformers_reads(tmp_path):
    model = GPT(SPEC, seed=3).eval()
    from shipyard.models.gpt.huggingface import gpt2_config, to_gpt2

    files = save_weights(to_gpt2(model.state_dict(), SPEC), tmp_path, max_shard_bytes=20_000)
    gpt2_config(SPEC).save_pretrained(tmp_path)
    assert files[-1] == "model.safetensors.index.json" and len(files) > 3
    opened = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(opened(TOKENS).logits, model(TOKENS), atol=1e-5, rtol=1e-5)


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import torch
from shipyard.models.gpt import GPT
from shipyard.serve.export import ExportError, write_export
from shipyard.spec.model import GptModelSpec

spec = GptModelSpec(layers=2, heads=2, width=16, sequence_length=16)
state = GPT(spec, seed=3).state_dict()
# A file may grow to 4 KiB here, as on a full disk (EFBIG instead of ENOSPC, without root).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_export(Path(sys.argv[1]), state, spec, job_name="tiny", step=7)
except ExportError as error:
    print(error)
"""


def test_a_full_disk_while_exporting_is_a_clear_error_and_leaves_nothing(tmp_path):
    import subprocess
    import sys

    (tmp_path / "checkpoint_1").mkdir()
    (tmp_path / "checkpoint_1" / "shipyard.json").write_text("{}")
    target = tmp_path / "exports" / "checkpoint_1-abc"
    target.parent.mkdir()
    answer = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(target)], capture_output=True, text=True
    )
    assert answer.returncode == 0, answer.stderr
    assert (
        f"{target}: the export could not be written (File too large (os error 27))" in answer.stdout
    )
    assert list(target.parent.iterdir()) == [], "no export and no staging folder is left"
    assert (tmp_path / "checkpoint_1" / "shipyard.json").read_text() == "{}"
