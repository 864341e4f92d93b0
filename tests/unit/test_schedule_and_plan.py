"""LR schedule shapes and the plan derived from a job spec."""

from __future__ import annotations

import math

import pytest

from shipyard.plan.plan import make_plan, split_evenly
from shipyard.spec.job import JobSpec, TrainSpec
from shipyard.train.schedule import lr_factor


def train(**fields) -> TrainSpec:
    return TrainSpec.model_validate({"max_steps": 110, "warmup_steps": 10, **fields})


def test_warmup_is_linear_to_the_peak():
    spec = train()
    assert lr_factor(0, spec) == pytest.approx(0.1)
    assert lr_factor(9, spec) == pytest.approx(1.0)


def test_cosine_decays_to_the_floor_halfway_at_the_midpoint():
    spec = train(lr_schedule="cosine", min_lr_ratio=0.2)
    assert lr_factor(10, spec) == pytest.approx(1.0)
    assert lr_factor(60, spec) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(110, spec) == pytest.approx(0.2)
    assert lr_factor(500, spec) == pytest.approx(0.2), "stays at the floor past max_steps"


def test_linear_and_constant():
    assert lr_factor(60, train(lr_schedule="linear", min_lr_ratio=0.0)) == pytest.approx(0.5)
    assert lr_factor(100, train(lr_schedule="constant")) == 1.0


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0, train(warmup_steps=0, lr_schedule="cosine")) == pytest.approx(1.0)
    assert math.isfinite(lr_factor(0, train(warmup_steps=0, max_steps=1)))


def test_split_evenly():
    assert split_evenly(7, 3) == (3, 2, 2)
    assert split_evenly(4, 2) == (2, 2)
    assert sum(split_evenly(13, 5)) == 13


def test_plan_explains_pipeline_and_offload():
    job = JobSpec.model_validate(
        {
            "name": "t",
            "model": {"layers": 5},
            "train": {
                "num_workers": 4,
                "pipeline_stages": 2,
                "zero_stage": 1,
                "offload_optimizer": True,
                "micro_batch_size": 2,
                "gradient_accumulation": 4,
            },
        }
    )
    plan = make_plan(job)
    assert plan.layers_per_stage == (3, 2)
    text = plan.explain()
    assert "data parallel 2 × pipeline 2; ZeRO stage 1, offloading optimizer to CPU" in text
    assert "2 per micro-batch × 4 accumulated × 2 replicas = 16 sequences per step" in text
    assert "stage 0: 3, stage 1: 2" in text
