"""Every class of job-spec mistake gets a message naming the file, the field and the fix."""

from __future__ import annotations

import pytest

from shipyard import SpecError, load_job
from shipyard.cli import main
from tests.conftest import REPO


def error_for(write_job, document) -> str:
    path = write_job(document)
    with pytest.raises(SpecError) as caught:
        load_job(path)
    message = str(caught.value)
    assert str(path) in message, "the error must name the file"
    return message


def job(**sections):
    return {"name": "t", **sections}


def test_minimal_spec_gets_defaults(write_job):
    loaded = load_job(write_job({"name": "tiny"}))
    assert loaded.train.zero_stage == 1
    assert loaded.model.vocabulary_size == 256
    assert loaded.storage.startswith("/"), "storage is resolved to an absolute path"


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_loads(path, shipped_pretrained):
    loaded = load_job(path)
    assert loaded.name


def test_misspelt_key_suggests_the_right_one(write_job):
    message = error_for(write_job, job(train={"zero_stag": 2}))
    assert "train.zero_stag: unknown field" in message
    assert "Did you mean 'zero_stage'?" in message


def test_unknown_top_level_section_lists_allowed_ones(write_job):
    message = error_for(write_job, job(trian={"lr": 1}))
    assert "Did you mean 'train'?" in message
    assert (
        "the top level allows: name, model, data, tokenizer, train, storage, artifacts" in message
    )


def test_value_outside_a_choice_lists_the_choices(write_job):
    message = error_for(write_job, job(train={"zero_stage": 4}))
    assert "train.zero_stage: 4 is not allowed (0, 1, 2 or 3)" in message


def test_wrong_type_names_field_and_value(write_job):
    message = error_for(write_job, job(train={"max_steps": "many"}))
    assert "train.max_steps: 'many' is not valid" in message


def test_missing_name_is_reported(write_job):
    message = error_for(write_job, {"train": {}})
    assert "name: is required but missing" in message


def test_all_problems_are_reported_together(write_job):
    message = error_for(write_job, job(train={"zero_stage": 9, "precision": "fp8"}))
    assert "train.zero_stage" in message
    assert "train.precision: 'fp8' is not allowed (fp32, bf16 or fp16)" in message


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"model": {"width": 100, "heads": 3}}, "model.heads: 3 does not divide model.width 100"),
        (
            {"train": {"pipeline_stages": 2, "zero_stage": 2}},
            "train.zero_stage: 2 cannot be combined with train.pipeline_stages 2",
        ),
        (
            {"train": {"num_workers": 3, "pipeline_stages": 2, "zero_stage": 1}},
            "train.num_workers: 3 is not divisible by train.pipeline_stages 2",
        ),
        (
            {"train": {"num_workers": 2, "pipeline_stages": 2, "tensor_parallel": 2}},
            "train.num_workers: 2 is not divisible by train.pipeline_stages 2 × "
            "train.tensor_parallel 2",
        ),
        (
            {"train": {"tensor_parallel": 2, "zero_stage": 3}},
            "train.zero_stage: 3 cannot be combined with train.tensor_parallel 2",
        ),
        (
            {"model": {"heads": 3, "width": 96}, "train": {"tensor_parallel": 2}},
            "train.tensor_parallel: 2 does not divide model.heads 3",
        ),
        (
            {"model": {"vocabulary_size": 257}, "train": {"tensor_parallel": 2}},
            "train.tensor_parallel: 2 does not divide model.vocabulary_size 257",
        ),
        (
            {"model": {"layers": 2}, "train": {"num_workers": 4, "pipeline_stages": 4}},
            "train.pipeline_stages: 4 is more than model.layers 2",
        ),
        (
            {"train": {"offload_parameters": True, "zero_stage": 2}},
            "train.offload_parameters: parameter offload needs train.zero_stage 3",
        ),
        (
            {"train": {"offload_optimizer": True, "zero_stage": 0}},
            "train.offload_optimizer: optimizer offload needs train.zero_stage 1, 2 or 3",
        ),
        ({"train": {"precision": "fp16"}}, "train.precision: fp16 needs a GPU"),
        (
            {
                "train": {
                    "num_workers": 2,
                    "micro_batch_size": 4,
                    "gradient_accumulation": 2,
                    "global_batch_size": 10,
                }
            },
            "train.global_batch_size: 10 does not equal micro_batch_size 4 × "
            "gradient_accumulation 2 × data-parallel workers 2 = 16",
        ),
        (
            {"train": {"warmup_steps": 50, "max_steps": 10}},
            "train.warmup_steps: 50 is longer than train.max_steps 10",
        ),
        ({"storage": "gs://bucket/x"}, "storage: 'gs://bucket/x' is not allowed"),
        ({"artifacts": "gs://bucket/x"}, "artifacts: 'gs://bucket/x' is not allowed"),
        ({"artifacts": "s3:///x"}, "a folder or s3://bucket/prefix is"),
    ],
)
def test_cross_field_rules(write_job, sections, expected):
    message = error_for(write_job, job(**sections))
    assert expected in message
    assert "To fix:" in message


def test_fp16_with_gpus_is_accepted(write_job):
    loaded = load_job(write_job(job(train={"precision": "fp16", "gpus_per_worker": 1})))
    assert loaded.train.precision == "fp16"


def test_global_batch_size_that_adds_up_is_accepted(write_job):
    document = job(
        train={
            "num_workers": 4,
            "pipeline_stages": 2,
            "micro_batch_size": 2,
            "gradient_accumulation": 3,
            "global_batch_size": 12,
        }
    )
    assert load_job(write_job(document)).train.data_parallel_size == 2


def test_invalid_yaml_names_the_line(write_job):
    message = error_for(write_job, "name: x\ntrain: [unclosed\n")
    assert "not valid YAML (line" in message


def test_non_mapping_document(write_job):
    assert "top level must be a mapping" in error_for(write_job, "- a\n- b\n")


def test_missing_file():
    with pytest.raises(SpecError, match="no such file"):
        load_job("jobs/does-not-exist.yaml")


def test_cli_prints_spec_error_without_traceback_and_exits_2(write_job, capsys):
    path = write_job(job(train={"zero_stage": 7}))
    assert main(["plan", str(path)]) == 2
    captured = capsys.readouterr()
    assert "train.zero_stage: 7 is not allowed" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_cli_train_rejects_bad_spec_before_starting_ray(write_job, capsys, monkeypatch):
    import shipyard.runtime.local

    def must_not_start(*args, **kwargs):
        raise AssertionError("Ray was started for a spec that is invalid")

    monkeypatch.setattr(shipyard.runtime.local, "ray_runtime", must_not_start)
    path = write_job(job(train={"pipeline_stages": 2, "zero_stage": 3}))
    assert main(["train", str(path)]) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_cli_plan_prints_the_layout(capsys):
    assert main(["plan", str(REPO / "jobs" / "tiny-gpt.yaml")]) == 0
    out = capsys.readouterr().out
    assert "data parallel 2 × pipeline 1; ZeRO stage 1" in out
    assert "8 per micro-batch × 2 accumulated × 2 replicas = 32 sequences per step" in out


@pytest.mark.parametrize("field", ["storage", "artifacts"])
def test_locations_are_a_folder_or_an_s3_prefix(write_job, field):
    for where in ("s3://models/team", "s3://models"):
        assert getattr(load_job(write_job(job(**{field: where}))), field) == where
    folder = getattr(load_job(write_job(job(**{field: "published"}))), field)
    assert folder.startswith("/") and folder.endswith("/published")
