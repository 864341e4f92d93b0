"""The parallel layout of a job as one frozen value, decided before anything starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shipyard.spec.job import JobSpec


@dataclass(frozen=True)
class ParallelPlan:
    """How a job's workers split the model and the batch; the code that acts only reads it."""

    num_workers: int
    pipeline_stages: int
    data_parallel_size: int
    zero_stage: int
    micro_batch_size: int
    gradient_accumulation: int
    offload_optimizer: bool
    offload_parameters: bool
    precision: str
    device: str  # "cpu" or "cuda"
    cpus_per_worker: float
    gpus_per_worker: float
    layers_per_stage: tuple[int, ...]

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step across all replicas."""
        return self.micro_batch_size * self.gradient_accumulation * self.data_parallel_size

    @property
    def backend(self) -> str:
        """torch.distributed backend: NCCL between GPUs, gloo on CPU."""
        return "nccl" if self.device == "cuda" else "gloo"

    def to_dict(self) -> dict:
        """Plain data for JSON output and for shipping to workers."""
        return asdict(self)

    def explain(self) -> str:
        """What will run and why, in a few lines."""
        offload = [
            name
            for name, on in (
                ("optimizer", self.offload_optimizer),
                ("parameters", self.offload_parameters),
            )
            if on
        ]
        lines = [
            f"{self.num_workers} workers on {self.device.upper()} "
            f"({self.cpus_per_worker:g} CPU, {self.gpus_per_worker:g} GPU each), "
            f"{self.backend} collectives",
            f"data parallel {self.data_parallel_size} × pipeline {self.pipeline_stages}; "
            f"ZeRO stage {self.zero_stage}"
            + (f", offloading {' and '.join(offload)} to CPU" if offload else ""),
            f"batch: {self.micro_batch_size} per micro-batch × {self.gradient_accumulation} "
            f"accumulated × {self.data_parallel_size} replicas = {self.global_batch_size} "
            "sequences per step",
            f"precision {self.precision}",
        ]
        if self.pipeline_stages > 1:
            split = ", ".join(
                f"stage {stage}: {count}" for stage, count in enumerate(self.layers_per_stage)
            )
            lines.append(f"transformer blocks per stage: {split}")
        return "\n".join(lines)


def make_plan(job: JobSpec) -> ParallelPlan:
    """The layout the job spec asks for (a cluster-aware planner refines this)."""
    train = job.train
    return ParallelPlan(
        num_workers=train.num_workers,
        pipeline_stages=train.pipeline_stages,
        data_parallel_size=train.data_parallel_size,
        zero_stage=train.zero_stage,
        micro_batch_size=train.micro_batch_size,
        gradient_accumulation=train.gradient_accumulation,
        offload_optimizer=train.offload_optimizer,
        offload_parameters=train.offload_parameters,
        precision=train.precision,
        device="cuda" if train.gpus_per_worker > 0 else "cpu",
        cpus_per_worker=train.cpus_per_worker,
        gpus_per_worker=train.gpus_per_worker,
        layers_per_stage=split_evenly(job.model.layers, train.pipeline_stages),
    )


def split_evenly(items: int, parts: int) -> tuple[int, ...]:
    """`items` as `parts` counts differing by at most one, larger counts first."""
    base, extra = divmod(items, parts)
    return tuple(base + (1 if part < extra else 0) for part in range(parts))
