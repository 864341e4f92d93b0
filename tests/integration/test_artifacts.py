"""A trained job's model published to S3 (moto on 127.0.0.1), listed, pulled and served."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from shipyard.cli import main
from shipyard.serve.deployment import prepare_service
from shipyard.serve.export import export_checkpoint, load_exported_model, read_export
from shipyard.spec.load import load_job
from shipyard.train.checkpoint import latest_checkpoint
from tests.integration.conftest import TINY_JOB

pytestmark = pytest.mark.integration


def test_a_trained_model_is_published_pulled_verified_and_served_from_s3(
    layouts, runs_dir, s3, tmp_path, capsys
):
    layouts("zero1", zero_stage=1)  # the session's ZeRO-1 run, 24 steps
    document = {
        **TINY_JOB,
        "name": "zero1",
        "storage": str(runs_dir),
        "train": {**TINY_JOB["train"], "zero_stage": 1},
        "artifacts": f"{s3}/models",
    }
    job_file = tmp_path / "zero1.yaml"
    job_file.write_text(yaml.safe_dump(document))
    assert main(["artifacts", "push", str(job_file)]) == 0
    assert main(["artifacts", "push", str(job_file)]) == 0  # a second version; none overwritten
    capsys.readouterr()
    assert main(["artifacts", "list", str(job_file)]) == 0
    listing = capsys.readouterr().out
    assert listing.count(" 24 ") == 2 and listing.count("←") == 1, listing

    assert main(["artifacts", "pull", str(job_file), "--to", str(tmp_path / "pulled")]) == 0
    (folder,) = (tmp_path / "pulled").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        "export",
        "job.yaml",
        "metrics.jsonl",
        "plan.json",
    ]
    saved = latest_checkpoint(str(runs_dir), "zero1")
    assert yaml.safe_load((folder / "job.yaml").read_text()) == saved.job
    assert json.loads((folder / "plan.json").read_text()) == saved.plan
    local = export_checkpoint(saved)
    assert read_export(folder / "export").sha256 == local.sha256

    # `shipyard serve --checkpoint s3://…` serves the latest published version, verified.
    service = prepare_service(load_job(job_file), f"{s3}/models")
    assert service.export.sha256 == local.sha256 and service.export.step == 24
    tokens = torch.randint(0, 256, (2, 16))
    served, trained = load_exported_model(service.export), load_exported_model(local)
    assert torch.equal(served(tokens), trained(tokens))


@pytest.mark.parametrize("field", ["storage", "artifacts"])
def test_training_refuses_a_bucket_that_does_not_exist(s3, tmp_path, capsys, field):
    document = {**TINY_JOB, "name": "nowhere", "storage": str(tmp_path / "runs")}
    document[field] = "s3://no-such-bucket/somewhere"
    job_file = tmp_path / "nowhere.yaml"
    job_file.write_text(yaml.safe_dump(document))
    assert main(["train", str(job_file)]) == 2
    error = capsys.readouterr().err
    assert "storage: s3://no-such-bucket/somewhere: bucket 'no-such-bucket' does not exist" in error
    assert not (tmp_path / "runs").exists(), "it failed before training started"
