"""The DeepSpeed config generated from a plan, for CPU and for the GPU path."""

from __future__ import annotations

import pytest

from shipyard.plan.plan import make_plan
from shipyard.spec.job import JobSpec
from shipyard.train.deepspeed_config import deepspeed_config


def config_for(**train):
    job = JobSpec.model_validate({"name": "t", "train": train})
    return deepspeed_config(make_plan(job), job.train), make_plan(job)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_is_passed_through(stage):
    config, _ = config_for(zero_stage=stage)
    assert config["zero_optimization"]["stage"] == stage
    assert "offload_optimizer" not in config["zero_optimization"]


def test_batch_arithmetic_matches_deepspeed_rules():
    config, plan = config_for(
        num_workers=4, pipeline_stages=2, micro_batch_size=3, gradient_accumulation=5
    )
    assert plan.data_parallel_size == 2
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 3 * 5 * 2


def test_tensor_parallel_ranks_are_not_replicas():
    # 8 workers = 2 replicas × 2 stages × 2 shards: DeepSpeed counts the batch per replica.
    config, plan = config_for(
        num_workers=8,
        pipeline_stages=2,
        tensor_parallel=2,
        micro_batch_size=3,
        gradient_accumulation=5,
        precision="bf16",
        gpus_per_worker=1,
    )
    assert plan.data_parallel_size == 2 and plan.tensor_parallel == 2
    assert config["train_batch_size"] == 3 * 5 * 2
    assert plan.backend == "nccl" and config["bf16"]["enabled"] is True


def test_cpu_uses_gloo_and_torch_adam():
    config, plan = config_for(zero_stage=2, offload_optimizer=True)
    assert plan.backend == "gloo"
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert config["zero_optimization"]["offload_optimizer"] == {
        "device": "cpu",
        "pin_memory": False,
    }


def test_gpu_path_uses_nccl_fused_adam_and_pinned_offload():
    config, plan = config_for(
        gpus_per_worker=1,
        zero_stage=3,
        offload_optimizer=True,
        offload_parameters=True,
        precision="bf16",
    )
    assert plan.device == "cuda"
    assert plan.backend == "nccl"
    assert "torch_adam" not in config["optimizer"]["params"]
    assert config["zero_force_ds_cpu_optimizer"] is True
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["bf16"] == {"enabled": True}
    assert config["fp16"] == {"enabled": False}


def test_fp16_gets_dynamic_loss_scaling():
    config, _ = config_for(gpus_per_worker=1, precision="fp16")
    assert config["fp16"]["enabled"] is True
    assert config["fp16"]["loss_scale"] == 0
    assert config["bf16"] == {"enabled": False}


def test_optimizer_hyperparameters():
    config, _ = config_for(
        optimizer="adam", lr=0.01, weight_decay=0.2, betas=[0.8, 0.9], gradient_clipping=0.5
    )
    assert config["optimizer"]["type"] == "Adam"
    params = config["optimizer"]["params"]
    assert params["lr"] == 0.01
    assert params["weight_decay"] == 0.2
    assert params["betas"] == [0.8, 0.9]
    assert config["gradient_clipping"] == 0.5
