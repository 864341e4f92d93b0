"""Scoring one candidate layout on real devices: where each rank sits, its memory, the step time.

A layout is a data-parallel × pipeline grid over devices sorted fastest first: pipeline stage s
takes the s-th slice of `data_parallel_size` devices, so a stage's replicas sit on like devices
and every replica is a pipeline of the same device types. Layers go to stages by stage speed,
bounded by memory; samples go to replicas by replica speed (uneven data parallelism). Under
tensor parallelism t every cell of the grid is a slot of t like devices on one node, which
split each layer between them.

Time model per optimizer step:
- compute: training FLOPs (3× the model's forward FLOPs per token, 4× with recomputation)
  ÷ the device's achieved TFLOPs, waiting for the slowest rank of every micro-step;
- pipeline: 1F1B keeps p - 1 micro-steps of bubble, and sends activations between stages;
- gradients: a ring all-reduce (ZeRO's reduce-scatter + all-gather moves the same bytes; ZeRO-3
  also gathers parameters, 1.5×) over the slowest link the data-parallel group crosses;
- optimizer: Adam streams its states through device memory, or runs on the host when offloaded
  after gradients and parameters cross PCIe;
- tensor parallel: each block all-reduces its (micro-batch × sequence × width) activations twice
  forward and twice backward (three times with recomputation) over the node's GPU link.
"""

from __future__ import annotations

from dataclasses import dataclass

from shipyard.plan.devices import DeviceGroup, speed
from shipyard.plan.memory import GIB, VALUE_BYTES, ModelSize, RankMemory, rank_memory
from shipyard.plan.partition import split_by_speed, split_evenly

HOST_LINK_GB_PER_S = 12.0  # achieved PCIe host <-> device copy bandwidth
HOST_ADAM_PARAMETERS_PER_S = 1e9  # DeepSpeed's CPU Adam, per rank
OPTIMIZER_PASSES = 2  # Adam reads and writes every state once


@dataclass(frozen=True)
class Layout:
    """The choices of one candidate; devices are the chosen groups' devices, fastest first."""

    groups: tuple[DeviceGroup, ...]
    pipeline_stages: int
    zero_stage: int
    offload_optimizer: bool
    offload_parameters: bool
    gradient_accumulation: int
    tensor_parallel: int = 1

    @property
    def devices(self) -> tuple[int, ...]:
        """Each device as the index of its group, fastest groups first."""
        return tuple(i for i, group in enumerate(self.groups) for _ in range(group.count))

    @property
    def slots(self) -> tuple[int, ...]:
        """Each slot of `tensor_parallel` devices (one device without it), as its group."""
        return self.devices[:: self.tensor_parallel]

    @property
    def data_parallel_size(self) -> int:
        return len(self.slots) // self.pipeline_stages

    def tensor_parallel_problem(self) -> str | None:
        """Why the groups cannot be cut into slots of one node each (None if they can)."""
        return slot_problem(self.groups, self.tensor_parallel)


def slot_problem(groups: tuple[DeviceGroup, ...], tensor_parallel: int) -> str | None:
    """Why `groups` cannot be cut into slots of `tensor_parallel` devices of one node each
    (None if they can)."""
    t = tensor_parallel
    for group in groups:
        if group.per_node % t or group.count % t:
            return (
                f"tensor parallel {t} needs {t} devices of one node per slot; "
                f"{group.node_type} has {group.per_node} per node ({group.count} used)"
            )
    return None


@dataclass(frozen=True)
class Rank:
    """One rank of a scored layout."""

    rank: int  # the slot's number; its tensor-parallel ranks follow each other
    stage: int
    replica: int
    group: DeviceGroup
    layers: int
    micro_batch_size: int
    memory: RankMemory


@dataclass(frozen=True)
class StepTime:
    """Estimated seconds per optimizer step, by cause."""

    compute: float
    bubble: float
    pipeline_transfer: float
    gradient_sync: float
    optimizer: float
    engine: float = 0.0  # DeepSpeed's measured time beyond the math (replaces the two above)
    tensor_sync: float = 0.0  # tensor parallelism's all-reduces inside every block

    @property
    def total(self) -> float:
        return (
            self.compute
            + self.bubble
            + self.pipeline_transfer
            + self.gradient_sync
            + self.optimizer
            + self.engine
            + self.tensor_sync
        )


@dataclass(frozen=True)
class Scored:
    """A layout that fits, with its ranks and step time."""

    layout: Layout
    ranks: tuple[Rank, ...]
    layers_per_stage: tuple[int, ...]
    replica_micro_batches: tuple[int, ...]
    step: StepTime


@dataclass(frozen=True)
class Workload:
    """What every candidate trains: the model, the global batch and the precision."""

    size: ModelSize
    global_batch_size: int
    precision: str
    checkpointing: bool
    even_splits: bool = False  # split layers and samples evenly, as if devices were alike
    tensor_parallel_options: tuple[int, ...] = (1,)  # widths the model splits into (auto)
    max_pipeline_stages: int = 1_000_000  # 1 for a model that cannot be cut into stages


def score(layout: Layout, work: Workload) -> Scored | str:
    """The layout's ranks and step time, or why it cannot run."""
    stages, dp = layout.pipeline_stages, layout.data_parallel_size
    if work.global_batch_size % layout.gradient_accumulation:
        return f"global batch {work.global_batch_size} is not a multiple of the accumulation"
    if problem := layout.tensor_parallel_problem():
        return problem
    samples = work.global_batch_size // layout.gradient_accumulation  # per micro-step
    grid = [layout.slots[stage * dp : (stage + 1) * dp] for stage in range(stages)]
    if stages == 1:
        micro = _split_samples(layout, work, grid[0], samples)
        layers: tuple[int, ...] | str = (work.size.layers,)
    else:
        if samples % dp:
            return f"{samples} samples per micro-step do not split over {dp} pipelines"
        micro = (samples // dp,) * dp
        layers = _split_layers(layout, work, grid, micro[0])
    if isinstance(micro, str):
        return micro
    if isinstance(layers, str):
        return layers
    ranks = _ranks(layout, work, grid, layers, micro)
    problem = _memory_problem(ranks)
    if problem:
        return problem
    step = _step_time(layout, work, grid, ranks, layers)
    return Scored(layout, ranks, layers, micro, step)


def _split_samples(layout, work, devices, samples) -> tuple[int, ...] | str:
    groups = [layout.groups[i] for i in devices]
    caps = [_max_micro_batch(layout, work, group) for group in groups]
    if any(cap < 1 for cap in caps):
        worst = groups[caps.index(min(caps))]
        return f"the whole model does not fit one {worst.device.name} even at micro-batch 1"
    split = _split(samples, [_speed(group, work) for group in groups], caps, None, work)
    if split is None:
        return f"{samples} samples per micro-step exceed what the devices' memory holds"
    return split


def _max_micro_batch(layout: Layout, work: Workload, group: DeviceGroup) -> int:
    """The largest micro-batch whose memory fits `group`'s devices with the whole model."""
    empty, one = (
        _rank_memory(layout, work, work.size.layers, True, True, micro, 1) for micro in (0, 1)
    )
    if not _fits(empty, group):
        return 0
    per_sample = one.device - empty.device
    return int((group.usable_gib * GIB - _device_bytes(empty, group)) // per_sample)


def _split_layers(layout, work, grid, micro) -> tuple[int, ...] | str:
    stages = len(grid)
    speeds, caps = [], []
    for stage, devices in enumerate(grid):
        groups = [layout.groups[i] for i in devices]
        speeds.append(min(_speed(group, work) for group in groups))
        in_flight = min(stages - stage, layout.gradient_accumulation)
        first, last = stage == 0, stage == stages - 1
        empty, one = (_rank_memory(layout, work, n, first, last, micro, in_flight) for n in (0, 1))
        per_layer = one.device - empty.device
        caps.append(
            min(int((g.usable_gib * GIB - _device_bytes(empty, g)) // per_layer) for g in groups)
        )
    if work.size.layers < stages:
        return f"{work.size.layers} layers cannot fill {stages} pipeline stages"
    head_share = _head_flops(work.size) / block_flops(work.size, work.checkpointing)  # same /t
    fixed = [0.0] * (stages - 1) + [head_share]
    split = _split(work.size.layers, speeds, caps, fixed, work)
    if split is None:
        return f"the layers do not fit {stages} stages' memory at micro-batch {micro}"
    return split


def _split(units, speeds, caps, fixed, work: Workload) -> tuple[int, ...] | None:
    if not work.even_splits:
        return split_by_speed(units, speeds, caps, fixed)
    even = split_evenly(units, len(speeds))
    return even if all(share <= cap for share, cap in zip(even, caps, strict=True)) else None


def _ranks(layout, work, grid, layers, micro) -> tuple[Rank, ...]:
    stages, dp = len(grid), layout.data_parallel_size
    ranks = []
    for stage, devices in enumerate(grid):
        in_flight = min(stages - stage, layout.gradient_accumulation) if stages > 1 else 1
        for replica, index in enumerate(devices):
            memory = _rank_memory(
                layout,
                work,
                layers[stage],
                stage == 0,
                stage == stages - 1,
                micro[replica],
                in_flight,
            )
            ranks.append(
                Rank(
                    stage * dp + replica,
                    stage,
                    replica,
                    layout.groups[index],
                    layers[stage],
                    micro[replica],
                    memory,
                )
            )
    return tuple(ranks)


def _rank_memory(layout, work, layers, first, last, micro, in_flight) -> RankMemory:
    return rank_memory(
        work.size.shard(layout.tensor_parallel),
        layers=layers,
        has_embedding=first,
        has_head=last,
        micro_batch_size=micro,
        in_flight=in_flight,
        precision=work.precision,
        checkpointing=work.checkpointing,
        zero_stage=layout.zero_stage,
        data_parallel_size=layout.data_parallel_size,
        offload_optimizer=layout.offload_optimizer,
        offload_parameters=layout.offload_parameters,
    )


def _device_bytes(memory: RankMemory, group: DeviceGroup) -> float:
    """What counts against the device: on a CPU worker, offloaded states share its memory."""
    return memory.device if group.device.is_gpu else memory.device + memory.host


def _fits(memory: RankMemory, group: DeviceGroup) -> bool:
    host_ok = memory.host <= group.host_gib_per_device * GIB
    return _device_bytes(memory, group) <= group.usable_gib * GIB and host_ok


def _memory_problem(ranks: tuple[Rank, ...]) -> str | None:
    for rank in ranks:
        if not _fits(rank.memory, rank.group):
            name = rank.group.device.name
            if rank.memory.host > rank.group.host_gib_per_device * GIB:
                return (
                    f"offloaded states need {rank.memory.host / GIB:.1f} GiB of host memory per "
                    f"{name}, its node has {rank.group.host_gib_per_device:.1f}"
                )
            return (
                f"rank {rank.rank} needs {_device_bytes(rank.memory, rank.group) / GIB:.1f} GiB "
                f"on a {name}, which has {rank.group.usable_gib:.1f} GiB usable"
            )
    return None


def _speed(group: DeviceGroup, work: Workload, micro_batch_size: int = 0) -> float:
    return speed(group.device, work.precision, micro_batch_size * work.size.sequence_length)


def block_flops(size: ModelSize, checkpointing: bool) -> float:
    """Training FLOPs of one block per token: its forward (2 per parameter plus attention) ×3,
    ×4 when the forward is recomputed."""
    return size.block_flops * (4 if checkpointing else 3)


def _head_flops(size: ModelSize) -> float:
    return 3 * size.head_flops


def _step_time(layout, work, grid, ranks, layers) -> StepTime:
    size, stages, accumulation = work.size, len(grid), layout.gradient_accumulation
    per_micro = {}
    for rank in ranks:
        flops = rank.layers * block_flops(size, work.checkpointing)
        if rank.stage == stages - 1:
            flops += _head_flops(size)
        tokens = rank.micro_batch_size * size.sequence_length
        per_micro[rank.rank] = (
            flops
            * tokens
            / layout.tensor_parallel
            / _speed(rank.group, work, rank.micro_batch_size)
        )
    slowest = max(per_micro.values())
    tensor_sync = accumulation * max(_tensor_sync(layout, work, rank) for rank in ranks)
    compute = accumulation * slowest
    bubble = (stages - 1) * slowest
    transfer = 0.0
    if stages > 1:
        activation = ranks[0].micro_batch_size * size.sequence_length * size.width
        activation *= VALUE_BYTES[work.precision]
        links = [_link_between(layout, grid[s], grid[s + 1]) for s in range(stages - 1)]
        transfer = (accumulation + stages - 1) * 2 * activation / (min(links) * 1e9)
    if all(rank.group.device.step_overhead_s for rank in ranks):
        # Measured on this machine (`--profile`): the engine's overhead per micro-step, plus the
        # step's gradient reduction and optimizer, instead of the modelled ones.
        engine = max(
            accumulation * rank.group.device.micro_step_overhead_s
            + rank.group.device.step_overhead_s
            - rank.group.device.micro_step_overhead_s
            for rank in ranks
        )
        return StepTime(compute, bubble, transfer, 0.0, 0.0, engine, tensor_sync)
    sync = max(_gradient_sync(layout, work, grid[s], layers[s], s, stages) for s in range(stages))
    optimizer = _optimizer_time(layout, work, ranks)
    return StepTime(compute, bubble, transfer, sync, optimizer, 0.0, tensor_sync)


def _tensor_sync(layout: Layout, work: Workload, rank: Rank) -> float:
    """One micro-step's all-reduces of a tensor-parallel slot: per block, two forward and two
    backward (plus the recomputed forward's two), a ring over the node's GPU link."""
    t = layout.tensor_parallel
    if t == 1:
        return 0.0
    size = work.size
    activation = rank.micro_batch_size * size.sequence_length * size.width
    per_block = (6 if work.checkpointing else 4) * activation * VALUE_BYTES[work.precision]
    return rank.layers * per_block * 2 * (t - 1) / t / (rank.group.device.link_gb_per_s * 1e9)


def _gradient_sync(layout, work, devices, layers, stage, stages) -> float:
    dp = len(devices)
    if dp == 1:
        return 0.0
    held = work.size.shard(layout.tensor_parallel).held(layers, stage == 0, stage == stages - 1)
    volume = held * VALUE_BYTES[work.precision]
    volume *= 2 * (dp - 1) / dp * (1.5 if layout.zero_stage == 3 else 1.0)
    return volume / (_slowest_link(layout, devices) * 1e9)


def _slowest_link(layout: Layout, slots) -> float:
    """Within one node, the GPUs' link; across nodes, the slowest node's network share."""
    groups = sorted(set(slots))
    devices = slots.count(groups[0]) * layout.tensor_parallel
    spans_nodes = len(groups) > 1 or devices > layout.groups[groups[0]].per_node
    if not spans_nodes:
        return layout.groups[groups[0]].device.link_gb_per_s
    return min(
        min(layout.groups[i].network_gb_per_s, layout.groups[i].device.link_gb_per_s)
        for i in groups
    )


def _link_between(layout, sending, receiving) -> float:
    if set(sending) == set(receiving) and len(set(sending)) == 1:
        group = layout.groups[sending[0]]
        if (len(sending) + len(receiving)) * layout.tensor_parallel <= group.per_node:
            return group.device.link_gb_per_s
    return min(layout.groups[i].network_gb_per_s for i in {*sending, *receiving})


def _optimizer_time(layout: Layout, work: Workload, ranks) -> float:
    slowest, stages = 0.0, layout.pipeline_stages
    for rank in ranks:
        states = rank.memory.model_states
        if layout.offload_optimizer:  # ZeRO-Offload: Adam on the host over this rank's shard
            parameters = work.size.shard(layout.tensor_parallel).held(
                rank.layers, rank.stage == 0, rank.stage == stages - 1
            )
            shard = parameters / layout.data_parallel_size
            # 16-bit gradients cross down, 16-bit weights back up.
            crossing = 2 * shard * 2 / (HOST_LINK_GB_PER_S * 1e9)
            seconds = shard / HOST_ADAM_PARAMETERS_PER_S + crossing
        else:
            bandwidth = rank.group.device.memory_bandwidth_gb_per_s * 1e9
            seconds = OPTIMIZER_PASSES * states.device / bandwidth
        if layout.offload_parameters:  # ZeRO-Infinity streams weights in for forward and backward
            weights = 2 * rank.layers * work.size.shard(layout.tensor_parallel).block * 2
            seconds += layout.gradient_accumulation * weights / (HOST_LINK_GB_PER_S * 1e9)
        slowest = max(slowest, seconds)
    return slowest
