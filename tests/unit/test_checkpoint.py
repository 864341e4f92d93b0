"""Listing a job's checkpoints the way Ray Train will resume them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shipyard.train.checkpoint import (
    METADATA_FILE,
    RAY_CHECKPOINT_SNAPSHOT,
    latest_checkpoint,
    saved_checkpoints,
)


def make_checkpoint(run: Path, folder: str, step: int) -> None:
    (run / folder).mkdir(parents=True)
    metadata = {"job": {"name": "j"}, "plan": {}, "metrics": {"step": step}}
    (run / folder / METADATA_FILE).write_text(json.dumps(metadata))


def register(run: Path, *folders: str) -> None:
    results = [{"checkpoint_dir_name": folder, "metrics": {}} for folder in folders]
    (run / RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps({"checkpoint_results": results}))


def test_only_registered_checkpoints_count(tmp_path):
    run = tmp_path / "j"
    make_checkpoint(run, "checkpoint_b", 20)
    make_checkpoint(run, "checkpoint_a", 10)
    make_checkpoint(run, "checkpoint_c", 30)  # uploaded, but the run stopped before Ray knew
    register(run, "checkpoint_b", "checkpoint_a")
    assert [c.step for c in saved_checkpoints(str(tmp_path), "j")] == [10, 20]
    assert latest_checkpoint(str(tmp_path), "j").path == str(run / "checkpoint_b")


def test_no_run_means_no_checkpoint(tmp_path):
    assert saved_checkpoints(str(tmp_path), "nothing") == []
    assert latest_checkpoint(str(tmp_path), "nothing") is None


def test_resume_is_refused_for_every_change_but_reporting_cadence_and_placement():
    from shipyard.plan.plan import make_plan
    from shipyard.spec.job import JobSpec
    from shipyard.train.checkpoint import SavedCheckpoint, resume_changes

    job = JobSpec(name="j", train={"max_steps": 40, "eval_every": 10, "checkpoint_every": 20})
    plan = json.loads(json.dumps(make_plan(job).to_dict()))  # as a checkpoint saves it
    saved = SavedCheckpoint("x", 20, job.model_dump(mode="json"), plan, {"step": 20})

    def changes(job_update: dict, plan_update: dict | None = None) -> list[str]:
        document = job.model_dump(mode="json")
        for path, value in job_update.items():
            section, _, key = path.rpartition(".")
            target = document
            for part in filter(None, section.split(".")):
                target = target[part]
            target[key] = value
        new = JobSpec.model_validate(document).model_dump(mode="json")
        return [path for path, _, _ in resume_changes(saved, new, {**plan, **(plan_update or {})})]

    free = {"train.log_every": 5, "train.checkpoint_every": 40, "tracking.mlflow": False}
    assert changes({**free, "train.cpus_per_worker": 0.4, "serve.port": 9000}) == []
    assert changes({"data.source": "corpus/*.jsonl", "train.seed": 1}) == [
        "data.source",
        "train.seed",
    ]
    assert changes({"train.precision": "bf16", "model.dropout": 0.1}) == [
        "model.dropout",
        "train.precision",
    ]
    # A longer run follows another learning-rate curve, except at a constant rate.
    assert changes({"train.max_steps": 80}) == ["train.max_steps"]
    saved.job["train"]["lr_schedule"] = "constant"
    assert changes({"train.max_steps": 80, "train.lr_schedule": "constant"}) == []
    # `parallelism: auto` re-planned elsewhere: another split of the layers is refused, other
    # nodes for the same ranks are not.
    assert changes({"train.lr_schedule": "constant"}, {"layers_per_stage": [1, 3]}) == [
        "plan.layers_per_stage"
    ]
    assert changes({"train.lr_schedule": "constant"}, {"cluster": "other", "ranks": [1]}) == []


def test_a_corpus_whose_content_changed_is_not_resumed(tmp_path):
    from shipyard.data.corpus import Corpus
    from shipyard.data.tokenizer import BYTES
    from shipyard.errors import SpecError
    from shipyard.plan.plan import make_plan
    from shipyard.spec.job import JobSpec
    from shipyard.train.trainer import check_resumable, check_same_corpus

    job = JobSpec(name="j", storage=str(tmp_path), data={"source": "corpus.jsonl"})
    plan = make_plan(job)
    metadata = {
        "job": job.model_dump(mode="json"),
        "plan": plan.to_dict(),
        "metrics": {"step": 10},
        "corpus": "tokens-of-before",
    }
    run = tmp_path / "j"
    (run / "checkpoint_a").mkdir(parents=True)
    (run / "checkpoint_a" / METADATA_FILE).write_text(json.dumps(metadata))
    register(run, "checkpoint_a")

    def corpus(key: str) -> Corpus:
        return Corpus("x", key, "uint16", {}, {}, 1, "corpus.jsonl", BYTES, 0.0)

    saved = check_resumable(job, plan)  # the spec and plan alone are the same
    check_same_corpus(job, saved, corpus("tokens-of-before"))
    with pytest.raises(SpecError, match=r"data.source \(its content, tokenized\): 'tokens-of-now'"):
        check_same_corpus(job, saved, corpus("tokens-of-now"))
