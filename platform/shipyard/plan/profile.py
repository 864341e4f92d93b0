"""Measured speed of the job's layers on the devices at hand (`shipyard plan --profile`).

Catalog TFLOPs mislead: published planners' cost models miss by 20–30%. So Shipyard times one
transformer block, forward and backward, at several micro-batch sizes on each device type
(train/profiler.py runs the timings in Ray Train workers: acting stays out of plan/) and fits
the two numbers its time model uses for that device:

    achieved FLOP/s = peak × efficiency × tokens / (tokens + half_efficiency_tokens)

(1 / achieved is linear in 1 / tokens, so a least-squares line gives both). Profiles are cached
per device, thread count, precision and block shape; `shipyard plan` and `shipyard train` use a
cached profile wherever one matches a device of the plan.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from shipyard import hardware
from shipyard.plan.devices import DeviceGroup, cpu_threads
from shipyard.spec.job import JobSpec
from shipyard.storage import cache_root, write_atomically

MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)
REPEATS = 21
WARMUP_ROUNDS = 2


@dataclass(frozen=True)
class DeviceProfile:
    """What one device reached on one block shape, and the curve fitted to it."""

    device: str  # catalog name ("CPU" for CPU workers)
    threads: int  # CPU threads per worker (GPUs: 0)
    precision: str
    block: str  # the block shape measured: width, heads, sequence length
    efficiency: float
    half_efficiency_tokens: float
    seconds_by_micro_batch: dict[int, float]  # one block, forward + backward
    # Per ZeRO stage measured: DeepSpeed's seconds beyond the math ("micro_step", "step").
    engine_overhead: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return profile_key(self.device, self.threads, self.precision, self.block)


def profile_key(device: str, threads: int, precision: str, block: str) -> str:
    return f"{device}-{threads}t-{precision}-{block}"


def block_shape(job: JobSpec) -> str:
    """What a profile is valid for: the model family, its block's width and size, the
    sequence length."""
    from shipyard.models import model_family

    size = model_family(job.model).size()
    return f"{job.model.type}-w{size.width}-p{size.block}-s{size.sequence_length}"


def cache_folder() -> Path:
    """Where profiles are kept (SHIPYARD_CACHE, else ~/.cache/shipyard)."""
    return cache_root() / "profiles"


def save_profile(profile: DeviceProfile) -> Path:
    """Cache `profile`, keeping engine overheads measured before for other ZeRO stages."""
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{profile.key}.json"
    data = asdict(profile)
    earlier = _read_profile(path) if path.exists() else None
    if earlier is not None:
        data["engine_overhead"] = {**earlier.engine_overhead, **profile.engine_overhead}
    write_atomically(path, json.dumps(data, indent=2))  # a crash mid-write leaves the old one
    return path


def load_profiles(job: JobSpec) -> dict[str, DeviceProfile]:
    """Cached profiles of this job's block shape, by key (a corrupt one is left out)."""
    found = {}
    for path in cache_folder().glob(f"*-{block_shape(job)}.json"):
        profile = _read_profile(path)
        if profile is not None:
            found[profile.key] = profile
    return found


def _read_profile(path: Path) -> DeviceProfile | None:
    """The profile cached in `path`; None, with a warning, if the file is not one: a cache
    entry is only worth a new measurement, never a failed run."""
    try:
        data = json.loads(path.read_text())
        data["seconds_by_micro_batch"] = {
            int(micro): float(seconds) for micro, seconds in data["seconds_by_micro_batch"].items()
        }
        return DeviceProfile(**data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        print(
            f"Warning: {path}: not a device profile ({type(error).__name__}: {error}); it is "
            "ignored. `shipyard profile` measures the device again and replaces it.",
            file=sys.stderr,
        )
        return None


def calibrate(
    groups: tuple[DeviceGroup, ...], job: JobSpec, profiles: dict[str, DeviceProfile]
) -> tuple[DeviceGroup, ...]:
    """`groups` with measured efficiency curves where a profile of their device exists."""
    calibrated = []
    for group in groups:
        device = group.device
        threads = 0 if device.is_gpu else cpu_threads(job.train.cpus_per_worker)
        key = profile_key(device.name, threads, job.train.precision, block_shape(job))
        profile = profiles.get(key)
        if profile and not group.simulated:
            overhead = profile.engine_overhead.get(str(job.train.zero_stage), {})
            device = replace(
                device,
                efficiency=profile.efficiency,
                half_efficiency_tokens=profile.half_efficiency_tokens,
                micro_step_overhead_s=overhead.get("micro_step", 0.0),
                step_overhead_s=overhead.get("step", 0.0),
                measured_flops={
                    profile.precision: measured_flops(job, profile.seconds_by_micro_batch)
                },
            )
        calibrated.append(replace(group, device=device))
    return tuple(calibrated)


def block_seconds(job: JobSpec, where: str, threads: int) -> dict[int, float]:
    """Median seconds of one block's forward and backward at each micro-batch size on `where`
    ("cpu" with `threads` threads, or "cuda"). Sizes are timed in rounds, so a burst of noise
    from a neighbour hits them alike."""
    import torch

    from shipyard.models import model_family

    family = model_family(job.model)
    size = family.size()
    dtype = torch_dtype(job.train.precision)
    previous_threads = torch.get_num_threads()
    if where == "cpu":
        torch.set_num_threads(threads)
    try:
        block = family.block(seed=0).to(device=where, dtype=dtype)
        shape = (size.sequence_length, size.width)
        inputs = {
            micro: torch.randn((micro, *shape), device=where, dtype=dtype, requires_grad=True)
            for micro in MICRO_BATCH_SIZES
        }
        times: dict[int, list[float]] = {micro: [] for micro in MICRO_BATCH_SIZES}
        for round_ in range(WARMUP_ROUNDS + REPEATS):  # warm-up rounds fill allocator caches
            for micro, x in inputs.items():
                seconds = timed(lambda x=x: block(x).float().square().mean().backward(), where)
                if round_ >= WARMUP_ROUNDS:
                    times[micro].append(seconds)
        return {micro: float(np.median(each)) for micro, each in times.items()}
    finally:
        torch.set_num_threads(previous_threads)


def timed(run, where: str) -> float:
    """Seconds `run()` takes on `where`, waiting for a GPU to finish its queued work."""
    import torch

    if where != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if where != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measured_flops(job: JobSpec, seconds: dict[int, float]) -> tuple[tuple[float, float], ...]:
    """(tokens per micro-batch, FLOP/s reached) of each measured size, in the time model's
    FLOPs, by ascending tokens."""
    from shipyard.models import model_family
    from shipyard.plan.search import block_flops

    size = model_family(job.model).size()
    flops_per_token = block_flops(size, checkpointing=False)
    return tuple(
        (micro * size.sequence_length, flops_per_token * micro * size.sequence_length / s)
        for micro, s in sorted(seconds.items())
    )


def fit_profile(
    job: JobSpec, device: hardware.Device, threads: int, seconds: dict[int, float]
) -> DeviceProfile:
    """The efficiency curve through the measured block times."""
    precision = job.train.precision
    points = np.array(measured_flops(job, seconds))
    tokens, achieved = points[:, 0], points[:, 1]
    slope, intercept = np.polyfit(1.0 / tokens, 1.0 / achieved, 1)
    peak = device.tflops[precision] * 1e12
    efficiency = 1.0 / (intercept * peak) if intercept > 0 else achieved.max() / peak
    half = max(slope / intercept, 0.0) if intercept > 0 else 0.0
    return DeviceProfile(
        device=device.name,
        threads=threads,
        precision=precision,
        block=block_shape(job),
        efficiency=float(efficiency),
        half_efficiency_tokens=float(half),
        seconds_by_micro_batch=seconds,
    )


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
