"""Building the DeepSpeed engine: the whole model for data parallel/ZeRO, stages for pipelines."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from deepspeed.runtime.pipe import PipelineModule
from torch.optim.lr_scheduler import LambdaLR

from shipyard.models import model_family
from shipyard.models.loss import language_model_loss
from shipyard.models.tensor_parallel import SINGLE, TensorParallel
from shipyard.plan.plan import ParallelPlan
from shipyard.spec.job import JobSpec, TrainSpec
from shipyard.train.schedule import lr_factor


def build_engine(
    job: JobSpec, plan: ParallelPlan, config: dict[str, Any], tp: TensorParallel = SINGLE
):
    """deepspeed.initialize on the model this plan calls for, with Shipyard's LR schedule.

    With tensor parallelism, `tp` is this rank's group from `process_grid`, which DeepSpeed also
    gets (as `mpu`) so that it averages gradients and partitions ZeRO states over the
    data-parallel ranks only and sums gradient norms over the shards."""
    import deepspeed

    model = build_model(job, plan, tp)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=config,
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda step: lr_factor(step, job.train)),
        mpu=tp.grid if tp.active and plan.pipeline_stages == 1 else None,
    )
    return engine


def process_grid(plan: ParallelPlan):
    """DeepSpeed's rank layout for pipeline × data × tensor parallel, tensor parallel varying
    fastest (so a tensor-parallel group is adjacent ranks, which Ray packs onto one node).

    Creates every group on every rank, in the same order: all ranks must call it together."""
    from deepspeed.runtime.pipe.topology import (
        PipelineParallelGrid,
        PipeModelDataParallelTopology,
    )

    topology = PipeModelDataParallelTopology(
        num_pp=plan.pipeline_stages, num_mp=plan.tensor_parallel, num_dp=plan.data_parallel_size
    )
    return PipelineParallelGrid(topology=topology)


def tensor_parallel_group(plan: ParallelPlan) -> TensorParallel:
    """This rank's tensor-parallel group (SINGLE without tensor parallelism)."""
    if plan.tensor_parallel == 1:
        return SINGLE
    grid = process_grid(plan)
    return TensorParallel(
        size=plan.tensor_parallel,
        rank=grid.get_slice_parallel_rank(),
        group=grid.get_slice_parallel_group(),
        grid=grid,
    )


def apply_hyperparameters(engine, train: TrainSpec) -> None:
    """Make a restored optimizer follow `train`'s lr, weight decay and betas.

    DeepSpeed restores them from the checkpoint along with the moments. A resumed job whose lr
    was changed, or a PBT trial continuing another trial's checkpoint with perturbed values,
    must train with its own. The schedule position (steps taken) is kept.
    """
    scheduler = engine.lr_scheduler
    factor = lr_factor(scheduler.last_epoch, train)
    scheduler.base_lrs = [train.lr for _ in scheduler.base_lrs]
    for group in engine.optimizer.param_groups:
        group["initial_lr"] = train.lr
        group["lr"] = train.lr * factor
        group["weight_decay"] = train.weight_decay
        group["betas"] = tuple(train.betas)


def build_model(job: JobSpec, plan: ParallelPlan, tp: TensorParallel = SINGLE) -> torch.nn.Module:
    """The model whole, or as this rank's pipeline stage with the plan's blocks per stage (either
    holding this rank's tensor-parallel share)."""
    family = model_family(job.model)
    if plan.pipeline_stages == 1:
        return family.build(job.train.seed, tp)
    from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

    pipeline = family.pipeline(job.train.seed, tp)
    return PlannedPipeline(
        blocks_per_stage=plan.layers_per_stage,
        leading=pipeline.leading,
        trailing=pipeline.trailing,
        layers=pipeline.layers,
        num_stages=None if tp.active else plan.pipeline_stages,
        topology=tp.grid.topology() if tp.active else None,
        loss_fn=partial(language_model_loss, tp=tp),
        activation_checkpoint_interval=1 if job.model.activation_checkpointing else 0,
        activation_checkpoint_func=non_reentrant_checkpoint,
        checkpointable_layers=pipeline.checkpointable,
    )


class PlannedPipeline(PipelineModule):
    """A PipelineModule whose stages hold the planned number of blocks.

    DeepSpeed only splits uniformly or by parameter count; the planner decides per stage (a faster
    device gets more blocks), so we set the stage boundaries ourselves. The `leading` input pieces
    (embeddings) go with the first stage and the `trailing` output pieces (norm, head) with the
    last.
    """

    def __init__(self, blocks_per_stage: tuple[int, ...], leading: int, trailing: int, **kwargs):
        # Read by _partition_layers during PipelineModule.__init__.
        self._blocks_per_stage, self._leading, self._trailing = blocks_per_stage, leading, trailing
        super().__init__(**kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        boundaries = [0, self._leading]
        for blocks in self._blocks_per_stage:
            boundaries[-1] += blocks
            boundaries.append(boundaries[-1])
        boundaries.pop()
        boundaries[-1] += self._trailing
        self.parts = boundaries
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=boundaries[stage], stop=boundaries[stage + 1])
