"""Sweep search spaces: dotted job-spec paths with distributions, checked before Ray starts."""

from __future__ import annotations

import pytest

from shipyard.errors import SpecError
from shipyard.spec.job import JobSpec
from shipyard.sweep.search_space import apply_overrides, parse_search_space

BASE = JobSpec(name="swept")
SOURCE = "jobs/swept.yaml"


def test_a_valid_space_becomes_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = {
        "train.lr": {"loguniform": [1.0e-4, 3.0e-3]},
        "model.dropout": {"uniform": [0.0, 0.2]},
        "train.micro_batch_size": {"randint": [2, 8]},
        "model.layers": {"choice": [2, 4]},
        "train.zero_stage": {"grid": [1, 2]},
    }
    dimensions = parse_search_space(space, BASE, SOURCE)
    assert [d.path for d in dimensions] == list(space)
    domains = [d.to_tune() for d in dimensions]
    assert isinstance(domains[0], Float) and isinstance(domains[1], Float)
    assert isinstance(domains[2], Integer) and domains[2].upper == 9, "randint's high is inclusive"
    assert isinstance(domains[3], Categorical)
    assert domains[4] == {"grid_search": [1, 2]}


def test_overrides_make_a_validated_job():
    job = apply_overrides(BASE, {"train.lr": 0.002, "model.layers": 2}, SOURCE)
    assert (job.train.lr, job.model.layers) == (0.002, 2)
    assert BASE.model.layers == 4, "the base job is unchanged"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.lrr": {"choice": [0.1]}}, "train has no field 'lrr'. Did you mean 'train.lr'?"),
        ({"optimizer.lr": {"choice": [0.1]}}, "the job spec has no field 'optimizer'"),
        ({"train": {"choice": [1]}}, "is a section, not a field"),
        ({"name.x": {"choice": [1]}}, "name is a field, not a section"),
        ({"train.lr": {"gaussian": [0, 1]}}, "'gaussian' is not a distribution"),
        ({"train.lr": {"loguniform": [0, 1]}}, "low < high, low > 0"),
        ({"train.lr": {"uniform": [0.3]}}, "takes [low, high] numbers"),
        ({"train.micro_batch_size": {"randint": [1.5, 4]}}, "takes [low, high] integers"),
        ({"train.lr": {"choice": []}}, "needs a non-empty list"),
        ({"train.lr": 0.1}, "must be one distribution"),
        ({"train.zero_stage": {"grid": [1, 4]}}, "train.zero_stage: 4 is not allowed"),
        ({"model.heads": {"choice": [3]}}, "model.heads: 3 does not divide model.width 128"),
        ({"train.lr": {"uniform": [0.001, 20]}}, "train.lr: 20"),
        ([], "must be a mapping"),
    ],
)
def test_bad_spaces_name_the_file_and_the_path(space, message):
    with pytest.raises(SpecError) as error:
        parse_search_space(space, BASE, SOURCE)
    assert message in str(error.value)
    assert str(error.value).startswith(SOURCE)
