"""`shipyard plan --profile`: time the job's model where it will train, as a Ray Train run.

Catalog TFLOPs mislead; on a small model DeepSpeed's bookkeeping costs as much as the math;
and whatever shares a node with the workers slows them too (on a 2-core machine, Ray's own
processes take a sixth of it). So the profile runs where and as training runs: a Ray Train run
of up to two ranks, with the job's resources per worker, pinned by label to one node type.
Each rank times, with the other rank busy too:
- one transformer block, forward and backward, at micro-batches 1 to 16 on its device;
- the whole model's forward and backward at the job's micro-batch, then the same in the job's
  DeepSpeed engine (its ZeRO stage and precision): what a micro-step takes beyond the math when
  it only accumulates (`micro_step`) and when it also reduces gradients and steps (`step`).
On the embedded Ray that is this machine; joined to a cluster, every node type with nodes up.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, replace
from typing import Any

import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Queue

from shipyard.errors import TrainingError
from shipyard.plan.devices import DeviceGroup, cpu_threads, device_groups
from shipyard.plan.profile import DeviceProfile, block_seconds, fit_profile, timed, torch_dtype
from shipyard.spec.cluster import ClusterSpec, labels_match
from shipyard.spec.job import JobSpec

RANKS = 2
WARMUP_STEPS = 2
TIMED_STEPS = 20


@dataclass(frozen=True)
class Target:
    """One node type to profile: its devices, where to pin the ranks and how many."""

    group: DeviceGroup
    node_selector: dict[str, str] | None
    ranks: int


def profile_cluster(job: JobSpec, cluster: ClusterSpec) -> tuple[list[DeviceProfile], list[str]]:
    """Profiles of `cluster`'s node types that have real devices up in the joined Ray cluster,
    and a line for each node type skipped, saying why."""
    from shipyard.errors import SpecError
    from shipyard.models import model_family

    if model_family(job.model).block(seed=0) is None:
        raise SpecError(
            f"job {job.name}: --profile times one block of the model, and this model has no "
            "block Shipyard can run alone (a Hugging Face architecture without a piece adapter, "
            "or a factory module that is not an nn.Sequential). The plan uses the catalog's "
            "speeds. To fix: plan without --profile."
        )
    targets, skipped = profile_targets(job, cluster, ray.nodes())
    return [profile_node_type(job, target) for target in targets], skipped


def profile_targets(
    job: JobSpec, cluster: ClusterSpec, nodes: list[dict[str, Any]]
) -> tuple[list[Target], list[str]]:
    """What of `cluster` can be profiled on the live `nodes` (Ray's node table)."""
    groups = device_groups(cluster, job.train)
    targets, skipped = [], []
    for group in groups:
        if group.simulated:
            skipped.append(
                f"{group.node_type}: a fake node posing as {group.device.name}; its CPU would "
                "say nothing about that GPU"
            )
            continue
        selector = group.node_selector if len(groups) > 1 else None
        slots = sum(_worker_slots(node, group, job) for node in nodes if _matches(node, selector))
        if slots == 0:
            skipped.append(
                f"{group.node_type}: no node of it is up in this Ray cluster. To profile it: "
                "start the cluster (ray up) and pass --address"
            )
            continue
        targets.append(Target(group, selector, min(RANKS, slots)))
    return targets, skipped


def _matches(node: dict[str, Any], selector: dict[str, str] | None) -> bool:
    labels = node.get("Labels") or {}
    return node.get("Alive", False) and labels_match(selector or {}, labels)


def _worker_slots(node: dict[str, Any], group: DeviceGroup, job: JobSpec) -> int:
    resources = node.get("Resources", {})
    if group.device.is_gpu:
        return int(resources.get("GPU", 0))
    return int(resources.get("CPU", 0) // job.train.cpus_per_worker)


def profile_node_type(job: JobSpec, target: Target) -> DeviceProfile:
    """Run the timing ranks on `target`'s node type and fit its profile."""
    gpu = target.group.device.is_gpu
    resources = {"CPU": job.train.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    results = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _time_on_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "results": results},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=target.ranks,
            use_gpu=gpu,
            resources_per_worker=resources,
            label_selector=[target.node_selector] * target.ranks if target.node_selector else None,
        ),
        run_config=RunConfig(
            name=f"profile-{target.group.node_type}",
            storage_path=tempfile.mkdtemp(prefix="shipyard-profile-"),
        ),
    )
    try:
        trainer.fit()
        measured = results.get(timeout=10)
    except ray.train.TrainingFailedError as error:
        raise TrainingError(f"profiling {target.group.node_type} failed: {error}") from None
    finally:
        ray.kill(results.actor)
    threads = 0 if gpu else cpu_threads(job.train.cpus_per_worker)
    blocks = {int(micro): seconds for micro, seconds in measured["block_seconds"].items()}
    profile = fit_profile(job, target.group.device, threads, blocks)
    engine = {"micro_step": measured["micro_step"], "step": measured["step"]}
    return replace(profile, engine_overhead={str(job.train.zero_stage): engine})


def _time_on_worker(config: dict[str, Any]) -> None:
    """Each rank's timings (Ray Train worker); rank 0 sends its numbers to the driver."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from shipyard.models import model_family
    from shipyard.models.loss import language_model_loss
    from shipyard.plan.plan import make_plan
    from shipyard.train.deepspeed_config import deepspeed_config

    context = ray.train.get_context()
    job = _profiling_job(JobSpec.model_validate(config["job"]), context.get_world_size())
    where = "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())
        where = "cuda"
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # Ray Train's process group
    dist.barrier()
    blocks = block_seconds(job, where, torch.get_num_threads())  # the other rank computes too
    dist.barrier()

    micro = job.train.micro_batch_size
    family = model_family(job.model)
    vocabulary, length = family.vocabulary_size, job.model.sequence_length
    tokens = torch.randint(0, vocabulary, (micro, length + 1), device=where)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    plain = family.build(job.train.seed).to(where, torch_dtype(job.train.precision))
    model = family.build(job.train.seed)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=deepspeed_config(make_plan(job), job.train),
    )

    def math_only() -> None:
        language_model_loss(plain(inputs), targets).backward()

    def micro_step() -> None:
        engine.backward(language_model_loss(engine(inputs), targets))
        engine.step()

    # The plain model and the engine take turns, so both see the same noise; even micro-steps
    # only accumulate, odd ones reduce gradients and step.
    plain_times, accumulating, stepping = [], [], []
    for index in range(2 * (WARMUP_STEPS + TIMED_STEPS)):
        dist.barrier()
        plain_seconds = timed(math_only, where)
        dist.barrier()
        engine_seconds = timed(micro_step, where)
        if index >= 2 * WARMUP_STEPS:
            plain_times.append(plain_seconds)
            (stepping if index % 2 else accumulating).append(engine_seconds)
    if context.get_world_rank() == 0:
        math_seconds = statistics.median(plain_times)
        config["results"].put(
            {
                "block_seconds": blocks,
                "micro_step": max(statistics.median(accumulating) - math_seconds, 0.0),
                "step": max(statistics.median(stepping) - math_seconds, 0.0),
            }
        )


def _profiling_job(job: JobSpec, ranks: int) -> JobSpec:
    """The job as the profile runs it: data parallel over `ranks`, two micro-steps per step."""
    train = job.train.model_copy(
        update={
            "num_workers": ranks,
            "pipeline_stages": 1,
            "gradient_accumulation": 2,
            "global_batch_size": None,
        }
    )
    return job.model_copy(update={"train": train})
