"""The DeepSpeed config dict for a plan: one place that maps Shipyard's choices to DeepSpeed's."""

from __future__ import annotations

from typing import Any

from shipyard.plan.plan import ParallelPlan
from shipyard.spec.job import TrainSpec

NEVER = 10**9  # DeepSpeed's own step printing; Shipyard reports metrics itself


def deepspeed_config(
    plan: ParallelPlan, train: TrainSpec, micro_batch_size: int | None = None
) -> dict[str, Any]:
    """Batch, optimizer, ZeRO and precision settings; the LR schedule is passed separately.

    `micro_batch_size` is this rank's when the plan splits samples unevenly. DeepSpeed checks
    only that its own numbers multiply up; the loss weights make the mean a global one.
    """
    micro = micro_batch_size or plan.micro_batch_size
    return {
        "train_batch_size": micro * plan.gradient_accumulation * plan.data_parallel_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": plan.gradient_accumulation,
        "gradient_clipping": train.gradient_clipping,
        "optimizer": optimizer_config(plan, train),
        "zero_optimization": zero_config(plan),
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": fp16_config(plan),
        # On CPU, offloading is a no-op move and DeepSpeed's CPU Adam would need a JIT build;
        # torch's AdamW does the same math.
        "zero_force_ds_cpu_optimizer": plan.device == "cuda",
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }


def optimizer_config(plan: ParallelPlan, train: TrainSpec) -> dict[str, Any]:
    """AdamW/Adam: fused on GPU (DeepSpeed's CPU Adam when offloaded), torch's on CPU."""
    params: dict[str, Any] = {
        "lr": train.lr,
        "betas": list(train.betas),
        "eps": 1e-8,
        "weight_decay": train.weight_decay,
    }
    if plan.device == "cpu":
        params["torch_adam"] = True
    return {"type": "AdamW" if train.optimizer == "adamw" else "Adam", "params": params}


def zero_config(plan: ParallelPlan) -> dict[str, Any]:
    """ZeRO stage and offload; pinned host memory only helps GPU transfers."""
    config: dict[str, Any] = {"stage": plan.zero_stage}
    pin = plan.device == "cuda"
    if plan.offload_optimizer:
        config["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if plan.offload_parameters:
        config["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if plan.zero_stage == 3:
        # Gather whole layers' weights when a checkpoint is saved, so exports are complete.
        config["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def fp16_config(plan: ParallelPlan) -> dict[str, Any]:
    """Dynamic loss scaling for fp16; bf16 and fp32 need none."""
    if plan.precision != "fp16":
        return {"enabled": False}
    return {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2}
