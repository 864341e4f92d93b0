"""The sweep: section and the decisions made before Tune starts: no Ray needed."""

from __future__ import annotations

import pickle
import re

import pytest
import yaml

from shipyard.cli import main
from shipyard.errors import ResourceError, SpecError
from shipyard.spec.job import JobSpec
from shipyard.spec.load import load_job
from shipyard.sweep.report import TrialTable
from shipyard.sweep.search_space import check_sweep
from shipyard.sweep.trial import trial_job
from shipyard.sweep.tuner import SWEEP_JOB_FILE, check_same_sweep, concurrent_trials

LR_SPACE = {"train.lr": {"loguniform": [1.0e-4, 3.0e-3]}}


def swept(sweep: dict, **train) -> dict:
    train = {"eval_every": 10, "checkpoint_every": 20, "max_steps": 40, **train}
    return {"name": "swept", "train": train, "sweep": {"space": LR_SPACE, **sweep}}


@pytest.fixture
def write(tmp_path):
    def write(document: dict):
        path = tmp_path / "swept.yaml"
        path.write_text(yaml.safe_dump(document))
        return path

    write.folder = tmp_path
    return write


def test_a_sweep_section_loads_with_defaults(write):
    job = load_job(write(swept({})))
    assert (job.sweep.metric, job.sweep.mode, job.sweep.scheduler) == ("val_loss", "min", "fifo")
    assert [d.path for d in check_sweep(job, "x")] == ["train.lr"]
    assert job.sweep.asha_settings.reduction_factor == 3.0


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (swept({"schedular": "asha"}), "sweep.schedular: unknown field. Did you mean 'scheduler'?"),
        (swept({"scheduler": "hyperband"}), "sweep.scheduler: 'hyperband' is not allowed"),
        (swept({"metric": "accuracy"}), "sweep.metric: 'accuracy' is not allowed"),
        (swept({"asha": {"grace_period": 5}}), "sweep.asha: settings for the asha scheduler"),
        (swept({"scheduler": "pbt", "search": "optuna"}), "cannot drive the pbt scheduler"),
        (swept({"num_samples": 0}), "sweep.num_samples: 0 is not valid"),
        (swept({}, eval_every=15), "train.checkpoint_every: 20 is not a multiple of"),
        (
            swept({"scheduler": "pbt", "pbt": {"perturbation_interval": 30}}),
            "sweep.pbt.perturbation_interval: 30 is not a multiple of",
        ),
        (
            swept({"scheduler": "asha", "asha": {"grace_period": 50}}),
            "sweep.asha.grace_period: 50 is longer than train.max_steps 40",
        ),
        (
            swept({"scheduler": "asha", "asha": {"promotion": "sometimes"}}),
            "sweep.asha.promotion: 'sometimes' is not allowed",
        ),
        (swept({"space": {"train.lrr": {"choice": [0.1]}}}), "Did you mean 'train.lr'?"),
        (swept({"space": {"sweep.seed": {"choice": [1, 2]}}}), "name the sweep itself"),
        (
            swept({"search": "optuna", "space": {"train.zero_stage": {"grid": [1, 2]}}}),
            "grid cannot be searched by optuna",
        ),
        (
            swept({"scheduler": "asha", "space": {"train.max_steps": {"choice": [20, 40]}}}),
            "the asha scheduler decides how long trials train",
        ),
        (
            swept({"scheduler": "pbt", "space": {"model.layers": {"choice": [2, 4]}}}),
            "pbt copies checkpoints between trials",
        ),
        (
            swept({"space": {"data.validation_fraction": {"uniform": [0.05, 0.1]}}}),
            "takes choice or grid, not uniform",
        ),
        # Its best trial is written as the job `<name>-best`: refused before the sweep, not after.
        ({**swept({}), "name": "n" * 96}, "name: 96 characters; a sweep's job name may have"),
    ],
)
def test_bad_sweep_sections_name_the_file_and_field(write, document, message):
    path = write(document)
    with pytest.raises(SpecError) as error:
        load_job(path)
    assert message in str(error.value)
    assert str(error.value).startswith(str(path))


def job_with(sweep: dict, **train) -> JobSpec:
    return JobSpec.model_validate(swept(sweep, **train))


def test_concurrency_is_what_the_cluster_fits_capped_by_the_spec():
    job = job_with({}, num_workers=2, cpus_per_worker=0.45)
    dimensions = check_sweep(job, "x")
    assert concurrent_trials(job, dimensions, {"CPU": 2.0}) == 2
    assert concurrent_trials(job, dimensions, {"CPU": 16.0}) == 17  # 16 / 0.91 CPUs each
    capped = job_with({"max_concurrent_trials": 3}, num_workers=2, cpus_per_worker=0.45)
    assert concurrent_trials(capped, dimensions, {"CPU": 16.0}) == 3


def test_concurrency_uses_the_largest_trial_in_the_space():
    job = job_with({"space": {"train.num_workers": {"choice": [1, 4]}}}, cpus_per_worker=1.0)
    assert concurrent_trials(job, check_sweep(job, "x"), {"CPU": 9.0}) == 2  # 4.01 CPUs each


def test_trials_that_cannot_fit_are_refused():
    job = job_with({}, num_workers=4, cpus_per_worker=1.0)
    with pytest.raises(ResourceError, match=r"one trial needs 4.01 CPUs .* has 2"):
        concurrent_trials(job, check_sweep(job, "x"), {"CPU": 2.0})
    population = job_with({"scheduler": "pbt", "num_samples": 3}, cpus_per_worker=0.45)
    with pytest.raises(ResourceError, match="pbt compares a population"):
        concurrent_trials(population, check_sweep(population, "x"), {"CPU": 2.0})


def test_a_changed_job_does_not_resume_the_saved_sweep(tmp_path):
    job = job_with({})
    (tmp_path / SWEEP_JOB_FILE).write_text(job.model_dump_json())
    check_same_sweep(tmp_path, job)  # the same job resumes
    changed = job_with({}, weight_decay=0.5)
    with pytest.raises(SpecError, match=r"train.weight_decay: 0.5 differs from 0.0"):
        check_same_sweep(tmp_path, changed)
    assert JobSpec.model_validate_json((tmp_path / SWEEP_JOB_FILE).read_text()) == job


def test_the_live_table_survives_tunes_experiment_snapshot():
    table = TrialTable("val_loss", ["train.lr"], 40)
    table._get_console()
    copy = pickle.loads(pickle.dumps(table))
    assert (copy.metric, copy.paths, copy._console) == ("val_loss", ["train.lr"], None)


def test_cli_sweep_refuses_a_job_without_a_sweep_before_starting_ray(write, capsys, monkeypatch):
    import shipyard.runtime.local

    def must_not_start(*args, **kwargs):
        raise AssertionError("Ray was started for a job it cannot sweep")

    monkeypatch.setattr(shipyard.runtime.local, "ray_runtime", must_not_start)
    assert main(["sweep", str(write({"name": "plain"}))]) == 2
    assert "the job has no sweep section" in capsys.readouterr().err
    assert main(["sweep", str(write(swept({"scheduler": "pbt", "search": "optuna"})))]) == 2
    assert "cannot drive the pbt scheduler" in capsys.readouterr().err
    nothing_saved = write({**swept({}), "storage": str(write.folder / "runs")})
    assert main(["sweep", str(nothing_saved), "--resume"]) == 2
    assert "there is no interrupted sweep of job 'swept'" in capsys.readouterr().err


def test_optuna_samples_the_space_it_is_given():
    """The Optuna (TPE) searcher takes Shipyard's domains and suggests valid trial values."""
    from shipyard.sweep.tuner import search_algorithm

    job = job_with(
        {
            "search": "optuna",
            "space": {
                "train.lr": {"loguniform": [1.0e-4, 3.0e-3]},
                "train.micro_batch_size": {"randint": [2, 8]},
                "model.layers": {"choice": [2, 4]},
            },
        }
    )
    dimensions = check_sweep(job, "x")
    searcher = search_algorithm(job, concurrent_trials=2)
    space = {dimension.path: dimension.to_tune() for dimension in dimensions}
    assert searcher.set_search_properties("val_loss", "min", space)
    suggestions = [searcher.suggest(f"trial{i}") for i in range(2)]
    for values in suggestions:
        assert 1.0e-4 <= values["train.lr"] <= 3.0e-3
        assert 2 <= values["train.micro_batch_size"] <= 8
        assert values["model.layers"] in (2, 4)
    assert searcher.suggest("trial3") is None, "the third waits: two trials at a time"


def test_asha_with_promotions_gates_the_search_by_its_running_trials():
    """Paused trials hold no slot: the search is capped by the scheduler, not by itself."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from shipyard.sweep.promotion import EndingAsha, Gate, PromotingAsha
    from shipyard.sweep.trial import end_trial_runs
    from shipyard.sweep.tuner import search_and_scheduler

    job = job_with({"scheduler": "asha", "asha": {"grace_period": 20}}, max_steps=200)
    chosen = search_and_scheduler(job, check_sweep(job, "x"), concurrent_trials=2)
    gate, asha = chosen["search_alg"], chosen["scheduler"]
    assert isinstance(gate, Gate) and isinstance(asha, PromotingAsha)
    assert gate.scheduler is asha and isinstance(gate.search, BasicVariantGenerator)
    assert gate.search.max_concurrent == 0
    assert (asha.rungs.milestones, asha.concurrent_trials) == ([20, 60, 180], 2)
    percentile = job_with({"scheduler": "asha", "asha": {"promotion": "percentile"}})
    tune_asha = search_and_scheduler(percentile, (), concurrent_trials=2)
    assert isinstance(tune_asha["scheduler"], EndingAsha)  # Tune's ASHA, ending cut trials
    assert asha.end_runs is tune_asha["scheduler"].end_runs is end_trial_runs


def test_optuna_under_paused_asha_is_gated_but_not_concurrency_limited():
    """A concurrency limiter would count paused trials as running; the gate counts them."""
    from ray.tune.search import SearchGenerator

    from shipyard.sweep.tuner import search_and_scheduler

    job = job_with({"scheduler": "asha", "search": "optuna"})
    dimensions = check_sweep(job, "x")
    gate = search_and_scheduler(job, dimensions, concurrent_trials=2)["search_alg"]
    assert type(gate.search) is SearchGenerator
    space = {dimension.path: dimension.to_tune() for dimension in dimensions}
    assert gate.set_search_properties("val_loss", "min", space)
    assert 1.0e-4 <= gate.search.searcher.suggest("trial0")["train.lr"] <= 3.0e-3


LLAMA = {
    "type": "huggingface",
    "architecture": "llama",
    "sequence_length": 16,
    "config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 256,
    },
}


def test_a_huggingface_config_field_is_searched_like_any_field(write):
    space = {"model.config.num_hidden_layers": {"choice": [1, 2, 3]}, **LR_SPACE}
    document = swept({"space": space, "scheduler": "asha"})
    job = load_job(write({**document, "model": LLAMA}))
    assert [d.path for d in check_sweep(job, "x")] == ["model.config.num_hidden_layers", "train.lr"]


@pytest.mark.parametrize(
    ("space", "scheduler", "message"),
    [
        (
            {"model.config.num_attention_heads": {"choice": [4, 5]}},
            "fifo",
            "sweep.space.model.config.num_attention_heads: model.config: ",
        ),
        (
            {"model.config.hidden_sise": {"choice": [32]}},
            "fifo",
            "model.config.hidden_sise: llama has no such config field. Did you mean 'hidden_size'?",
        ),
        (
            {"model.config.hidden_size": {"choice": [32, 64]}},
            "pbt",
            "pbt copies checkpoints between trials",
        ),
    ],
)
def test_a_searched_model_value_is_checked_as_the_model_would_be(write, space, scheduler, message):
    document = swept({"space": space, "scheduler": scheduler})
    with pytest.raises(SpecError, match=re.escape(message)):
        load_job(write({**document, "model": LLAMA}))


def test_a_trials_train_run_keeps_every_checkpoint_it_makes():
    """Tune copies a trial's checkpoints one report at a time, behind the ranks: Ray Train's own
    pruning must never remove one first, whatever the job keeps (Tune keeps that many)."""
    base = JobSpec.model_validate(
        swept({}, max_steps=45, eval_every=3, checkpoint_every=3, keep_checkpoints=1)
    )
    job = trial_job(base, {"train.lr": 1e-3}, "t1-abc", "/tmp/runs")
    saved_at = {step for step in range(1, 46) if step % 3 == 0 or step == 45}
    assert job.train.keep_checkpoints >= len(saved_at)
    assert (job.name, job.storage, job.sweep, job.train.lr) == ("t1-abc", "/tmp/runs", None, 1e-3)


@pytest.mark.parametrize("users_threshold", [None, "5"])
def test_tune_runs_without_tensorboardx_or_snapshot_warnings_unless_the_user_wants_them(
    monkeypatch, users_threshold
):
    import os

    from shipyard.sweep.tuner import NO_SNAPSHOT_WARNINGS, NO_TENSORBOARDX, tune_settings

    threshold, tensorboardx = NO_SNAPSHOT_WARNINGS[0], NO_TENSORBOARDX[0]
    monkeypatch.delenv(tensorboardx, raising=False)
    if users_threshold is None:
        monkeypatch.delenv(threshold, raising=False)
    else:
        monkeypatch.setenv(threshold, users_threshold)
    with tune_settings():
        assert os.environ[tensorboardx] == "1"
        assert os.environ[threshold] == (users_threshold or "0")
    assert tensorboardx not in os.environ
    assert os.environ.get(threshold) == users_threshold
