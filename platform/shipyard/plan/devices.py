"""The devices a cluster offers a job: one worker per GPU, or CPU worker slots on CPU clusters."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from shipyard import hardware
from shipyard.spec.cluster import ClusterSpec, NodeType
from shipyard.spec.job import TrainSpec

HOST_MEMORY_USABLE = 0.8  # of a node's memory, what training processes may take
GPU_MEMORY_USABLE_GIB = 1.5  # CUDA context, allocator fragmentation and NCCL buffers


@dataclass(frozen=True)
class DeviceGroup:
    """All devices of one node type: where a worker lands and what each device can do."""

    node_type: str
    device: hardware.Device
    nodes: int
    per_node: int
    count: int  # devices the plan may use: all of them, or the first ones a job asks for
    usable_gib: float  # device memory a rank may plan to fill
    host_gib_per_device: float  # host memory for offloaded states
    network_gb_per_s: float  # each node's share of the inter-node network
    usd_per_hour_per_device: float | None
    simulated: bool  # runs on CPU, planned as the GPU model the fake node advertises
    node_selector: dict[str, str]  # the node labels that place a rank on this node type

    def first(self, count: int) -> DeviceGroup:
        """Only `count` of these devices, packed onto as few nodes as they need."""
        return replace(self, count=count, nodes=math.ceil(count / self.per_node))


def device_groups(cluster: ClusterSpec, train: TrainSpec) -> tuple[DeviceGroup, ...]:
    """The cluster's worker devices, fastest node type first."""
    if cluster.has_gpus:
        groups = [_gpu_group(node) for node in cluster.node_types if node.gpus and node.max_nodes]
    else:
        groups = [
            group
            for node in cluster.node_types
            if node.max_nodes and (group := _cpu_group(node, train.cpus_per_worker)).count
        ]
    return fastest_first(groups, train.precision)


def fastest_first(groups, precision: str) -> tuple[DeviceGroup, ...]:
    """`groups` ordered by how fast their devices run `precision`."""
    return tuple(sorted(groups, key=lambda group: -speed(group.device, precision)))


def speed(device: hardware.Device, precision: str, tokens: float = 0) -> float:
    """FLOP/s `device` reaches in `precision` on micro-batches of `tokens` tokens (0 if it
    cannot run it; large micro-batches when `tokens` is 0)."""
    return device.achieved_flops(precision, tokens)


def cpu_threads(cpus_per_worker: float) -> int:
    """The torch threads Ray gives a CPU worker: its whole CPUs, at least one."""
    return max(1, int(cpus_per_worker))


def _gpu_group(node: NodeType) -> DeviceGroup:
    device = node.device
    assert device is not None  # the cluster loader refuses GPUs of unknown model
    price = node.usd_per_hour / node.gpus if node.usd_per_hour is not None else None
    return DeviceGroup(
        node_type=node.name,
        device=device,
        nodes=node.max_nodes,
        per_node=node.gpus,
        count=node.max_nodes * node.gpus,
        usable_gib=device.memory_gib - GPU_MEMORY_USABLE_GIB,
        host_gib_per_device=node.memory_gib * HOST_MEMORY_USABLE / node.gpus,
        network_gb_per_s=node.network_gbit / 8,
        usd_per_hour_per_device=price,
        simulated=node.simulated,
        node_selector=node.node_selector,
    )


def _cpu_group(node: NodeType, cpus_per_worker: float) -> DeviceGroup:
    slots = math.floor(node.cpus / cpus_per_worker + 1e-9)
    memory = node.memory_gib * HOST_MEMORY_USABLE / max(slots, 1)
    price = node.usd_per_hour / slots if node.usd_per_hour is not None and slots else None
    return DeviceGroup(
        node_type=node.name,
        device=hardware.cpu_device(cpu_threads(cpus_per_worker), memory),
        nodes=node.max_nodes,
        per_node=slots,
        count=node.max_nodes * slots,
        usable_gib=memory,
        host_gib_per_device=memory,
        network_gb_per_s=node.network_gbit / 8,
        usd_per_hour_per_device=price,
        simulated=False,
        node_selector=node.node_selector,
    )
