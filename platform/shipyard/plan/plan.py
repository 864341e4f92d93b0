"""The parallel layout of a job as one frozen value, decided before anything starts.

`make_plan(job)` is the layout exactly as the job writes it. `make_plan(job, cluster)` places it
on the cluster's devices: with `train.parallelism: manual` it keeps the job's workers, stages,
tensor parallelism, ZeRO stage, accumulation and offload, and splits layers and samples by
device speed; with `auto` it searches data parallel × pipeline × tensor parallel (within a
node) × ZeRO × accumulation × offload over the fastest device types and keeps the fastest
layout that fits.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from shipyard.errors import PlacementError, ResourceError
from shipyard.models import model_family
from shipyard.plan.devices import DeviceGroup, device_groups, fastest_first, speed
from shipyard.plan.memory import GIB
from shipyard.plan.partition import split_evenly
from shipyard.plan.search import Layout, Scored, Workload, score, slot_problem
from shipyard.spec.cluster import ClusterSpec, labels_match
from shipyard.spec.job import JobSpec


@dataclass(frozen=True)
class RankPlan:
    """Where one rank runs and what it holds."""

    rank: int
    stage: int
    replica: int
    node_type: str
    device: str
    layers: int
    micro_batch_size: int
    memory_gib: float
    capacity_gib: float
    host_memory_gib: float
    node_selector: dict[str, str]  # node labels that put this rank on its node type
    shard: int = 0  # its place in its tensor-parallel group


@dataclass(frozen=True)
class Estimate:
    """The time model's verdict on a placed plan."""

    step_seconds: float
    tokens_per_second: float
    usd_per_million_tokens: float | None
    seconds_by_cause: dict[str, float]


@dataclass(frozen=True)
class ParallelPlan:
    """How a job's workers split the model and the batch; the code that acts only reads it."""

    num_workers: int
    pipeline_stages: int
    data_parallel_size: int
    zero_stage: int
    micro_batch_size: int  # the largest replica's; every replica's is in replica_micro_batches
    gradient_accumulation: int
    offload_optimizer: bool
    offload_parameters: bool
    precision: str
    device: str  # "cpu" or "cuda"
    cpus_per_worker: float
    gpus_per_worker: float
    layers_per_stage: tuple[int, ...]
    tensor_parallel: int = 1  # ranks splitting each layer (adjacent ranks, on one node)
    replica_micro_batches: tuple[int, ...] = ()  # per data-parallel replica (empty: all equal)
    ranks: tuple[RankPlan, ...] = ()  # placed plans only
    estimate: Estimate | None = None
    cluster: str = ""
    select_nodes: bool = False  # the cluster has several node types: pin each rank to its own

    def node_type_of(self, labels: dict[str, str]) -> str | None:
        """Which of the plan's node types a node with these labels is (None: none of them)."""
        for rank in self.ranks:
            if labels_match(rank.node_selector, labels):
                return rank.node_type
        return None

    def roles(self, placed: list[str]) -> tuple[RankPlan, ...]:
        """The plan rank each world rank plays, given the node type Ray put each one on.

        Ray Train numbers ranks by node, not in the order of the label selectors it was given,
        so the k-th rank found on node type T takes the plan's k-th rank of T. A pipeline's
        stage and a tensor-parallel shard are fixed by the rank number (DeepSpeed's topology),
        so there the node type must also be the one planned for that rank.
        """
        waiting: dict[str, list[RankPlan]] = {}
        for planned in self.ranks:
            waiting.setdefault(planned.node_type, []).append(planned)
        wanted = [planned.node_type for planned in self.ranks]
        roles = []
        for rank, node_type in enumerate(placed):
            if not waiting.get(node_type):
                raise PlacementError(
                    f"Ray placed the ranks on {placed}, but the plan needs {wanted}"
                )
            role = waiting[node_type].pop(0)
            stage = rank // (self.data_parallel_size * self.tensor_parallel)
            fixed_by_rank = self.pipeline_stages > 1 or self.tensor_parallel > 1
            if fixed_by_rank and self.ranks[rank].node_type != node_type:
                raise PlacementError(
                    f"Ray placed rank {rank} (pipeline stage {stage}) on {node_type}, but the "
                    f"plan gives that rank {self.ranks[rank].node_type}: {placed} vs {wanted}"
                )
            roles.append(role)
        return tuple(roles)

    @property
    def micro_batches(self) -> tuple[int, ...]:
        """Each data-parallel replica's sequences per micro-batch."""
        even = (self.micro_batch_size,) * self.data_parallel_size
        return self.replica_micro_batches or even

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step across all replicas."""
        return sum(self.micro_batches) * self.gradient_accumulation

    @property
    def uneven_batches(self) -> bool:
        return len(set(self.micro_batches)) > 1

    @property
    def backend(self) -> str:
        """torch.distributed backend: NCCL between GPUs, gloo on CPU."""
        return "nccl" if self.device == "cuda" else "gloo"

    def to_dict(self) -> dict:
        """Plain data for JSON output and for shipping to workers."""
        return asdict(self)

    def summary(self) -> dict:
        """The plan's shape in a few plain values (for tracking): no per-rank detail."""
        shape = {k: v for k, v in self.to_dict().items() if isinstance(v, int | float | str)}
        shape["layers_per_stage"] = list(self.layers_per_stage)
        shape["micro_batches"] = list(self.micro_batches)
        shape["global_batch_size"] = self.global_batch_size
        return shape

    @classmethod
    def from_dict(cls, data: dict) -> ParallelPlan:
        """The plan `to_dict` wrote (after a trip through JSON or Ray)."""
        estimate = data.get("estimate")
        return cls(
            **{
                **data,
                "layers_per_stage": tuple(data["layers_per_stage"]),
                "replica_micro_batches": tuple(data.get("replica_micro_batches", ())),
                "ranks": tuple(RankPlan(**rank) for rank in data.get("ranks", ())),
                "estimate": Estimate(**estimate) if estimate else None,
            }
        )

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
        batches = (
            " + ".join(f"{count} × {size}" for size, count in _runs(self.replica_micro_batches))
            + " per micro-batch (uneven replicas)"
            if self.uneven_batches
            else f"{self.micro_batch_size} per micro-batch"
        )
        lines = [
            f"{self.num_workers} workers on {self.device.upper()} "
            f"({self.cpus_per_worker:g} CPU, {self.gpus_per_worker:g} GPU each), "
            f"{self.backend} collectives",
            f"data parallel {self.data_parallel_size} × pipeline {self.pipeline_stages}"
            + (f" × tensor parallel {self.tensor_parallel}" if self.tensor_parallel > 1 else "")
            + f"; ZeRO stage {self.zero_stage}"
            + (f", offloading {' and '.join(offload)} to CPU" if offload else ""),
            f"batch: {batches} × {self.gradient_accumulation} accumulated"
            + ("" if self.uneven_batches else f" × {self.data_parallel_size} replicas")
            + f" = {self.global_batch_size} sequences per step",
            f"precision {self.precision}",
        ]
        if self.pipeline_stages > 1:
            split = ", ".join(
                f"stage {stage}: {count}" for stage, count in enumerate(self.layers_per_stage)
            )
            lines.append(f"transformer blocks per stage: {split}")
        if self.ranks:
            lines.extend(_placement_lines(self))
        return "\n".join(lines)


def make_plan(
    job: JobSpec, cluster: ClusterSpec | None = None, profiles: dict | None = None
) -> ParallelPlan:
    """The job's layout as written, or (given a cluster) the fastest placement that fits.

    `profiles` (from `plan.profile`) replace catalog speeds with measured ones where they match.
    """
    if cluster is None:
        return _as_written(job)
    return chosen(job, cluster, candidates(job, cluster, profiles=profiles))


def chosen(job: JobSpec, cluster: ClusterSpec, ranked: list[Candidate]) -> ParallelPlan:
    """The best of `candidates(job, cluster)`, or why none fits and what would."""
    if not ranked or ranked[0].plan is None:
        raise ResourceError(_nothing_fits(job, cluster, ranked))
    return ranked[0].plan


@dataclass(frozen=True)
class Candidate:
    """One layout the planner considered: its plan if it fits, else why not."""

    summary: str
    plan: ParallelPlan | None
    rejected: str = ""


def candidates(
    job: JobSpec,
    cluster: ClusterSpec,
    *,
    even_splits: bool = False,
    every_device: bool = False,
    profiles: dict | None = None,
) -> list[Candidate]:
    """Every layout considered, fitting ones fastest first (cheaper first on a tie).

    `even_splits` and `every_device` give the baselines the planner is measured against: a
    uniform layout (even layers and batches) and one that must use the whole cluster.
    """
    train = job.train
    family = model_family(job.model)
    work = Workload(
        family.size(),
        train.global_batch_size
        or train.micro_batch_size * train.gradient_accumulation * train.data_parallel_size,
        train.precision,
        job.model.activation_checkpointing,
        even_splits,
        family.tensor_parallel_widths(),
        family.layers if family.layout_problem(2, 1) is None else 1,
    )
    groups = device_groups(cluster, train)
    if profiles:
        from shipyard.plan.profile import calibrate

        groups = fastest_first(calibrate(groups, job, profiles), train.precision)
    usable = [g for g in groups if speed(g.device, train.precision) > 0]
    if not usable:
        raise ResourceError(
            f"{cluster.source}: no device of the cluster can train in {train.precision} "
            f"(train.precision). To fix: pick a precision its devices support, or other nodes."
        )
    if train.parallelism == "manual":
        layouts = _manual_layouts(job, usable)
    else:
        layouts = _auto_layouts(usable, work, every_device)
    results = []
    for layout in layouts:
        scored = score(layout, work)
        summary = _summary(layout)
        if isinstance(scored, str):
            results.append(Candidate(summary, None, scored))
        else:
            results.append(Candidate(summary, _to_plan(job, cluster, scored, work)))
    return sorted(results, key=_rank_key)


def _rank_key(candidate: Candidate):
    plan = candidate.plan
    if plan is None:
        return (1, 0.0, 0.0, 0)
    estimate = plan.estimate
    cost = estimate.usd_per_million_tokens if estimate.usd_per_million_tokens is not None else 0
    return (0, round(estimate.step_seconds, 6), cost, plan.num_workers)


def _manual_layouts(job: JobSpec, groups: tuple[DeviceGroup, ...]) -> list[Layout]:
    """The job's own layout on its first `num_workers` devices, fastest first."""
    train = job.train
    available = sum(group.count for group in groups)
    if available < train.num_workers:
        raise ResourceError(
            f"train.num_workers: {train.num_workers} workers, but the cluster offers "
            f"{available} ({', '.join(f'{g.count} × {g.device.name}' for g in groups)}). "
            "To fix: lower num_workers, add nodes, or set train.parallelism: auto."
        )
    chosen, left = [], train.num_workers
    for group in groups:
        if left:
            take = min(left, group.count)
            chosen.append(group.first(take))
            left -= take
    return [
        Layout(
            tuple(chosen),
            train.pipeline_stages,
            train.zero_stage,
            train.offload_optimizer,
            train.offload_parameters,
            train.gradient_accumulation,
            train.tensor_parallel,
        )
    ]


def _auto_layouts(groups, work: Workload, every_device: bool) -> list[Layout]:
    """Fastest device types first (all of them, the fastest k types), every pipeline depth and
    tensor-parallel width (within one node) dividing the devices, every ZeRO stage they allow,
    with and without offload, every accumulation dividing the global batch."""
    layouts = []
    for k in range(len(groups) if every_device else 1, len(groups) + 1):
        chosen = tuple(groups[:k])
        devices = sum(group.count for group in chosen)
        for stages, tp in itertools.product(_divisors(devices), work.tensor_parallel_options):
            if stages > min(work.size.layers, work.max_pipeline_stages) or devices % (stages * tp):
                continue
            if slot_problem(chosen, tp):  # a layout that could never place its groups
                continue
            replicas = devices // (stages * tp)
            for zero in _zero_choices(stages, tp):
                for offload in _offload_choices(zero):
                    for accumulation in _divisors(work.global_batch_size):
                        if work.global_batch_size // accumulation < replicas:
                            continue
                        layouts.append(Layout(chosen, stages, zero, *offload, accumulation, tp))
    return layouts


def _zero_choices(stages: int, tensor_parallel: int) -> tuple[int, ...]:
    """DeepSpeed's pipeline allows ZeRO 0-1; Shipyard's tensor-parallel layers ZeRO 0-2."""
    if stages > 1:
        return (0, 1)
    return (0, 1, 2) if tensor_parallel > 1 else (0, 1, 2, 3)


def _offload_choices(zero: int) -> list[tuple[bool, bool]]:
    choices = [(False, False)]
    if zero >= 1:
        choices.append((True, False))
    if zero == 3:
        choices.append((True, True))
    return choices


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _to_plan(job: JobSpec, cluster: ClusterSpec, scored: Scored, work: Workload) -> ParallelPlan:
    layout, train = scored.layout, job.train
    gpu = any(g.device.is_gpu and not g.simulated for g in layout.groups)
    tp = layout.tensor_parallel
    ranks = tuple(
        RankPlan(
            rank=slot.rank * tp + shard,  # DeepSpeed's order: the shard varies fastest
            stage=slot.stage,
            replica=slot.replica,
            node_type=slot.group.node_type,
            device=slot.group.device.name,
            layers=slot.layers,
            micro_batch_size=slot.micro_batch_size,
            memory_gib=round(slot.memory.device / GIB, 3),
            capacity_gib=round(slot.group.usable_gib, 3),
            host_memory_gib=round(slot.memory.host / GIB, 3),
            node_selector=slot.group.node_selector,
            shard=shard,
        )
        for slot in scored.ranks
        for shard in range(tp)
    )
    step = scored.step
    tokens = work.global_batch_size * work.size.sequence_length
    prices = [g.usd_per_hour_per_device for g in layout.groups]
    usd = None
    if all(price is not None for price in prices):
        per_hour = sum(price * g.count for price, g in zip(prices, layout.groups, strict=True))
        usd = per_hour / 3600 * step.total / tokens * 1e6
    estimate = Estimate(
        step_seconds=step.total,
        tokens_per_second=tokens / step.total,
        usd_per_million_tokens=usd,
        seconds_by_cause={
            "compute": step.compute,
            "pipeline bubble": step.bubble,
            "pipeline transfer": step.pipeline_transfer,
            "gradient sync": step.gradient_sync,
            "optimizer": step.optimizer,
            "DeepSpeed engine (measured)": step.engine,
            "tensor-parallel all-reduce": step.tensor_sync,
        },
    )
    micro = scored.replica_micro_batches
    return ParallelPlan(
        num_workers=len(ranks),
        pipeline_stages=layout.pipeline_stages,
        data_parallel_size=layout.data_parallel_size,
        zero_stage=layout.zero_stage,
        micro_batch_size=max(micro),
        gradient_accumulation=layout.gradient_accumulation,
        offload_optimizer=layout.offload_optimizer,
        offload_parameters=layout.offload_parameters,
        precision=train.precision,
        device="cuda" if gpu else "cpu",
        cpus_per_worker=train.cpus_per_worker,
        gpus_per_worker=1.0 if gpu else 0.0,
        layers_per_stage=scored.layers_per_stage,
        tensor_parallel=tp,
        replica_micro_batches=micro,
        ranks=ranks,
        estimate=estimate,
        cluster=cluster.name,
        select_nodes=len(cluster.node_types) > 1,
    )


def _summary(layout: Layout) -> str:
    offload = " +offload" if layout.offload_optimizer else ""
    offload += " +param offload" if layout.offload_parameters else ""
    devices = " + ".join(f"{g.count}×{g.device.name}" for g in layout.groups)
    tp = f" × tp {layout.tensor_parallel}" if layout.tensor_parallel > 1 else ""
    return (
        f"dp {layout.data_parallel_size} × pp {layout.pipeline_stages}{tp}, "
        f"ZeRO-{layout.zero_stage}{offload}, accumulate {layout.gradient_accumulation}, "
        f"on {devices}"
    )


def _nothing_fits(job: JobSpec, cluster: ClusterSpec, ranked: list[Candidate]) -> str:
    """Why no layout fits, and what would: ZeRO-3, offload, smaller micro-batches, more nodes."""
    reason = ranked[0].rejected if ranked else "no layout was possible"
    lines = [f"{cluster.source}: no layout of job {job.name!r} fits the cluster: {reason}."]
    if job.train.parallelism == "manual":
        relaxed = job.model_copy(
            update={"train": job.train.model_copy(update={"parallelism": "auto"})}
        )
        found = [c for c in candidates(relaxed, cluster) if c.plan is not None]
        if found:
            lines.append(
                f"To fix: set train.parallelism: auto (the planner found {found[0].summary}), "
                "or raise train.zero_stage / turn on offload / lower train.micro_batch_size."
            )
            return " ".join(lines)
    size = model_family(job.model).size()
    states = 16 * size.total / GIB
    biggest = max(device_groups(cluster, job.train), key=lambda g: g.usable_gib)
    needed = int(states // biggest.usable_gib) + 1
    lines.append(
        f"To fix: the model's states alone take {states:.1f} GiB under Adam; with ZeRO-3 and "
        f"offload that needs at least {needed} × {biggest.device.name} — add nodes, use "
        "larger GPUs, or shrink the model or the batch."
    )
    return " ".join(lines)


def _as_written(job: JobSpec) -> ParallelPlan:
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
        layers_per_stage=split_evenly(model_family(job.model).layers, train.pipeline_stages),
        tensor_parallel=train.tensor_parallel,
    )


def _placement_lines(plan: ParallelPlan) -> list[str]:
    lines = [f"placed on cluster {plan.cluster!r}:"]
    by_place: dict[tuple, list[RankPlan]] = {}
    for rank in plan.ranks:
        by_place.setdefault((rank.node_type, rank.device, rank.stage), []).append(rank)
    for (node_type, device, stage), ranks in by_place.items():
        first = ranks[0]
        micro = sorted({rank.micro_batch_size for rank in ranks})
        lines.append(
            f"  {node_type} ({device}): ranks {_ranges([r.rank for r in ranks])}, stage {stage}, "
            f"{first.layers} blocks, micro-batch {'/'.join(map(str, micro))}, "
            f"memory {max(r.memory_gib for r in ranks):.2f} of {first.capacity_gib:.1f} GiB"
            + (f" (+{first.host_memory_gib:.1f} GiB on host)" if first.host_memory_gib else "")
        )
    estimate = plan.estimate
    if estimate:
        causes = ", ".join(
            f"{name} {seconds * 1000:.1f} ms"
            for name, seconds in estimate.seconds_by_cause.items()
            if seconds
        )
        cost = (
            f", ${estimate.usd_per_million_tokens:.3f} per 1M tokens"
            if estimate.usd_per_million_tokens is not None
            else ""
        )
        lines.append(
            f"estimated step {estimate.step_seconds * 1000:.1f} ms ({causes}); "
            f"{estimate.tokens_per_second:,.0f} tokens/s{cost}"
        )
    return lines


def _runs(values: tuple[int, ...]) -> list[tuple[int, int]]:
    """Consecutive equal values as (value, how many)."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


def _ranges(numbers: list[int]) -> str:
    numbers = sorted(numbers)
    if numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 2:
        return f"{numbers[0]}–{numbers[-1]}"
    return ", ".join(map(str, numbers))
