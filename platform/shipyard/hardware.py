"""What each device can do: a catalog of GPU models and of cloud instance types.

Device names are Ray's accelerator type names (`ray.util.accelerators`), so a node that
advertises `accelerator_type:L4` finds its row directly. Figures are the vendors' published
dense (no sparsity) peaks; real throughput is lower, which is what `efficiency` and
`shipyard plan --profile` account for.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

GIB = 1024**3


@dataclass(frozen=True)
class Device:
    """One accelerator (or one CPU worker slot) as the planner sees it."""

    name: str
    memory_gib: float
    tflops: dict[str, float]  # dense peak per precision: fp32, bf16, fp16 (absent = unsupported)
    memory_bandwidth_gb_per_s: float
    link: str  # how devices of one node talk to each other
    link_gb_per_s: float  # per direction, between two devices of one node
    efficiency: float = 0.4  # the fraction of peak a transformer step reaches (typical MFU)
    # Small micro-batches leave a device idle between kernels: at this many tokens per
    # micro-batch it reaches half its efficiency (a saturation curve t / (t + this)).
    half_efficiency_tokens: float = 512.0
    # Measured by `--profile` (0: unknown, the time model then estimates communication and the
    # optimizer instead): DeepSpeed's seconds beyond the math per micro-step that only
    # accumulates, and per micro-step that also reduces gradients and steps the optimizer.
    micro_step_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    # Measured by `--profile`, per precision: (tokens per micro-batch, FLOP/s reached),
    # ascending. Where present they replace the curve; CPU caches do not saturate smoothly.
    measured_flops: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)

    @property
    def is_gpu(self) -> bool:
        return self.name != "CPU"

    def supports(self, precision: str) -> bool:
        return precision in self.tflops

    def achieved_flops(self, precision: str, tokens: float) -> float:
        """FLOP/s this device reaches on micro-batches of `tokens` tokens (0 if unsupported)."""
        if precision not in self.tflops:
            return 0.0
        if precision in self.measured_flops:
            return self._interpolated_flops(self.measured_flops[precision], tokens)
        saturation = tokens / (tokens + self.half_efficiency_tokens) if tokens else 1.0
        return self.tflops[precision] * 1e12 * self.efficiency * saturation

    def _interpolated_flops(self, points, tokens: float) -> float:
        """Linear between measured points; the curve's shape below the first; the last above
        it (and for "large micro-batches", tokens 0)."""
        first_tokens, first_flops = points[0]
        if not tokens or tokens >= points[-1][0]:
            return points[-1][1]
        if tokens <= first_tokens:
            half = self.half_efficiency_tokens
            return first_flops * (tokens / (tokens + half)) / (first_tokens / (first_tokens + half))
        for (t0, f0), (t1, f1) in itertools.pairwise(points):
            if tokens <= t1:
                return f0 + (f1 - f0) * (tokens - t0) / (t1 - t0)
        raise AssertionError("unreachable: tokens is below the last point")


def _gpu(name, memory_gib, fp32, bf16, fp16, bandwidth, link, link_gb_per_s) -> Device:
    tflops = {"fp32": fp32, "bf16": bf16, "fp16": fp16}
    return Device(
        name=name,
        memory_gib=memory_gib,
        tflops={precision: value for precision, value in tflops.items() if value},
        memory_bandwidth_gb_per_s=bandwidth,
        link=link,
        link_gb_per_s=link_gb_per_s,
    )


GPUS: dict[str, Device] = {
    device.name: device
    for device in (
        # NVIDIA H100 SXM5 datasheet: 80 GB HBM3 3.35 TB/s; NVLink 4 900 GB/s both ways.
        _gpu("H100", 80, 66.9, 989.4, 989.4, 3350, "NVLink4", 450),
        # NVIDIA A100 datasheet (SXM4): HBM2e 2,039 GB/s (80 GB), 1,555 GB/s (40 GB);
        # NVLink 3 600 GB/s both ways. FP32 without TF32.
        _gpu("A100-80G", 80, 19.5, 312, 312, 2039, "NVLink3", 300),
        _gpu("A100-40G", 40, 19.5, 312, 312, 1555, "NVLink3", 300),
        # NVIDIA V100 SXM2 datasheet: 900 GB/s, NVLink 2 300 GB/s both ways; no bf16.
        _gpu("V100-32G", 32, 15.7, 0, 125, 900, "NVLink2", 150),
        _gpu("V100-16G", 16, 15.7, 0, 125, 900, "NVLink2", 150),
        # NVIDIA L40S datasheet: 48 GB GDDR6 864 GB/s, PCIe Gen4 x16.
        _gpu("L40S", 48, 91.6, 362.05, 362.05, 864, "PCIe4", 32),
        # NVIDIA A10 datasheet (AWS's A10G has no sheet of its own): 24 GB 600 GB/s, PCIe Gen4.
        _gpu("A10G", 24, 31.2, 125, 125, 600, "PCIe4", 32),
        # NVIDIA L4 datasheet: 24 GB 300 GB/s, PCIe Gen4 x16.
        _gpu("L4", 24, 30.3, 121, 121, 300, "PCIe4", 32),
        # NVIDIA T4 datasheet: 16 GB 320 GB/s, PCIe Gen3 x16; no bf16.
        _gpu("T4", 16, 8.1, 0, 65, 320, "PCIe3", 16),
    )
}

# Ray's shorter names for the same parts; the smaller memory when Ray's name does not say.
GPU_ALIASES = {
    "A100": "A100-40G",
    "A100-80GB": "A100-80G",
    "A100-40GB": "A100-40G",
    "V100": "V100-16G",
    "V100-32GB": "V100-32G",
    "V100-16GB": "V100-16G",
    "H100-80G": "H100",
    "H100-80GB": "H100",
}

# One x86 core of a recent server: 2 AVX-512 FMA units at ~2.5 GHz ≈ 0.16 fp32 TFLOPs peak.
# Workers share the node's memory; gloo between processes of one node goes through memory.
CPU_CORE_TFLOPS = 0.16
CPU_EFFICIENCY = 0.15  # PyTorch eager on CPU reaches a small fraction of peak


def cpu_device(cores: float, memory_gib: float) -> Device:
    """A CPU worker slot of `cores` cores and a share of host memory `memory_gib`."""
    peak = cores * CPU_CORE_TFLOPS
    return Device(
        name="CPU",
        memory_gib=memory_gib,
        tflops={"fp32": peak, "bf16": peak / 2},  # no native bf16 FMA on most x86 parts
        memory_bandwidth_gb_per_s=10.0 * cores,
        link="memory",
        link_gb_per_s=5.0,
        efficiency=CPU_EFFICIENCY,
        half_efficiency_tokens=16.0,
    )


def gpu(name: str) -> Device | None:
    """The catalog row of a GPU model by Ray accelerator name (or a common alias)."""
    return GPUS.get(GPU_ALIASES.get(name, name))


def calibrated(device: Device, efficiency: float) -> Device:
    """`device` with a measured efficiency in place of the typical one."""
    return replace(device, efficiency=efficiency)


@dataclass(frozen=True)
class InstanceType:
    """A cloud machine: its GPUs, vCPUs, memory and network."""

    gpu: str | None
    gpu_count: int
    cpus: int
    memory_gib: float
    network_gbit: float  # between nodes, per node


def _family(gpu_name, network, rows) -> dict[str, InstanceType]:
    return {
        name: InstanceType(gpu_name, count, cpus, memory, net or network)
        for name, count, cpus, memory, net in rows
    }


# AWS EC2 and Google Compute Engine instance pages (accelerated computing), as published.
INSTANCE_TYPES: dict[str, InstanceType] = {
    # AWS: name, GPUs, vCPUs, memory GiB, network Gbit/s (0: the family's default).
    **_family("H100", 3200, [("p5.48xlarge", 8, 192, 2048, 0)]),
    **_family("A100-40G", 400, [("p4d.24xlarge", 8, 96, 1152, 0)]),
    **_family("A100-80G", 400, [("p4de.24xlarge", 8, 96, 1152, 0)]),
    **_family(
        "V100-16G",
        10,
        [
            ("p3.2xlarge", 1, 8, 61, 0),
            ("p3.8xlarge", 4, 32, 244, 0),
            ("p3.16xlarge", 8, 64, 488, 25),
        ],
    ),
    **_family("V100-32G", 100, [("p3dn.24xlarge", 8, 96, 768, 0)]),
    **_family(
        "A10G",
        25,
        [
            ("g5.xlarge", 1, 4, 16, 10),
            ("g5.2xlarge", 1, 8, 32, 10),
            ("g5.4xlarge", 1, 16, 64, 0),
            ("g5.8xlarge", 1, 32, 128, 0),
            ("g5.16xlarge", 1, 64, 256, 0),
            ("g5.12xlarge", 4, 48, 192, 40),
            ("g5.24xlarge", 4, 96, 384, 50),
            ("g5.48xlarge", 8, 192, 768, 100),
        ],
    ),
    **_family(
        "L4",
        25,
        [
            ("g6.xlarge", 1, 4, 16, 10),
            ("g6.2xlarge", 1, 8, 32, 10),
            ("g6.4xlarge", 1, 16, 64, 0),
            ("g6.8xlarge", 1, 32, 128, 0),
            ("g6.16xlarge", 1, 64, 256, 0),
            ("g6.12xlarge", 4, 48, 192, 40),
            ("g6.24xlarge", 4, 96, 384, 50),
            ("g6.48xlarge", 8, 192, 768, 100),
        ],
    ),
    **_family(
        "L40S",
        100,
        [
            ("g6e.xlarge", 1, 4, 32, 20),
            ("g6e.12xlarge", 4, 48, 384, 0),
            ("g6e.48xlarge", 8, 192, 1536, 400),
        ],
    ),
    **_family(
        "T4",
        50,
        [
            ("g4dn.xlarge", 1, 4, 16, 25),
            ("g4dn.2xlarge", 1, 8, 32, 25),
            ("g4dn.4xlarge", 1, 16, 64, 25),
            ("g4dn.8xlarge", 1, 32, 128, 0),
            ("g4dn.16xlarge", 1, 64, 256, 0),
            ("g4dn.12xlarge", 4, 48, 192, 0),
            ("g4dn.metal", 8, 96, 384, 100),
        ],
    ),
    # Google Cloud: machine type, GPUs attached with it, vCPUs, memory GB, network Gbit/s.
    **_family(
        "A100-40G",
        100,
        [
            ("a2-highgpu-1g", 1, 12, 85, 24),
            ("a2-highgpu-2g", 2, 24, 170, 32),
            ("a2-highgpu-4g", 4, 48, 340, 50),
            ("a2-highgpu-8g", 8, 96, 680, 0),
            ("a2-megagpu-16g", 16, 96, 1360, 0),
        ],
    ),
    **_family(
        "A100-80G",
        100,
        [
            ("a2-ultragpu-1g", 1, 12, 170, 24),
            ("a2-ultragpu-2g", 2, 24, 340, 32),
            ("a2-ultragpu-4g", 4, 48, 680, 50),
            ("a2-ultragpu-8g", 8, 96, 1360, 0),
        ],
    ),
    **_family("H100", 1000, [("a3-highgpu-8g", 8, 208, 1872, 0)]),
    **_family(
        "L4",
        16,
        [
            ("g2-standard-4", 1, 4, 16, 10),
            ("g2-standard-8", 1, 8, 32, 0),
            ("g2-standard-12", 1, 12, 48, 0),
            ("g2-standard-16", 1, 16, 64, 32),
            ("g2-standard-24", 2, 24, 96, 32),
            ("g2-standard-32", 1, 32, 128, 32),
            ("g2-standard-48", 4, 48, 192, 50),
            ("g2-standard-96", 8, 96, 384, 100),
        ],
    ),
}

# GCP `guestAccelerators[].acceleratorType` values for GPUs attached to a general machine.
GCP_ACCELERATORS = {
    "nvidia-tesla-t4": "T4",
    "nvidia-tesla-v100": "V100-16G",
    "nvidia-tesla-a100": "A100-40G",
    "nvidia-a100-80gb": "A100-80G",
    "nvidia-l4": "L4",
    "nvidia-h100-80gb": "H100",
}

DEFAULT_NETWORK_GBIT = 25.0  # what a cloud VM without a catalog row usually gets
