"""The planner's layouts against the two layouts a person would write by hand.

For several heterogeneous clusters and GPT sizes, print the planner's estimated step time and
how much slower (by the same time model) two baselines are:
- uniform: every device of the cluster, layers and samples split evenly (the best such layout
  over pipeline depth, ZeRO stage, accumulation and offload);
- best homogeneous subset: the fastest plan on one node type alone.
Also print how long planning took.

Part 2 (`--measure`): on this machine, profile the model's block on the CPU as a worker sees
it, then train several real layouts (ZeRO stages, a 2-stage pipeline, micro-batch sizes) on the
embedded Ray and print the planner's predicted step time against the measured one.

    .venv/bin/python benchmarks/planner.py [--measure]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time

from shipyard.errors import ResourceError
from shipyard.plan.plan import candidates
from shipyard.spec.cluster import ClusterSpec, parse_cluster
from shipyard.spec.job import JobSpec
from shipyard.spec.load import load_cluster

MODELS = {  # GPT-3 paper shapes: layers, width, heads
    "350M": (24, 1024, 16),
    "1.3B": (24, 2048, 16),
    "6.7B": (32, 4096, 32),
    "13B": (40, 5120, 40),
}


def cluster(name: str, nodes: dict[str, tuple[str, int]]) -> ClusterSpec:
    """A cluster of the named instance types (node type -> (instance type, node count))."""
    types = {"head": {"resources": {"CPU": 8}, "node_config": {}}}
    for node_type, (instance, count) in nodes.items():
        types[node_type] = {
            "resources": {},
            "node_config": {"InstanceType": instance},
            "max_workers": count,
        }
    document = {
        "cluster_name": name,
        "provider": {"type": "aws", "region": "us-east-1"},
        "head_node_type": "head",
        "available_node_types": types,
    }
    return parse_cluster(document, name)


def job(model: str, precision: str) -> JobSpec:
    layers, width, heads = MODELS[model]
    return JobSpec.model_validate(
        {
            "name": f"gpt-{model}",
            "model": {
                "layers": layers,
                "width": width,
                "heads": heads,
                "sequence_length": 2048,
                "vocabulary_size": 50304,
                "activation_checkpointing": True,
            },
            "train": {
                "parallelism": "auto",
                "gpus_per_worker": 1,
                "precision": precision,
                "global_batch_size": 512,
            },
        }
    )


def best_seconds(found) -> float | None:
    fitting = [c for c in found if c.plan is not None]
    return fitting[0].plan.estimate.step_seconds if fitting else None


def homogeneous(spec: ClusterSpec) -> list[ClusterSpec]:
    """The cluster cut down to each GPU node type alone."""
    heads = tuple(node for node in spec.node_types if node.is_head)
    return [
        dataclasses.replace(spec, node_types=(*heads, node))
        for node in spec.node_types
        if node.gpus
    ]


def ratio(baseline: float | None, planned: float) -> str:
    return f"{baseline / planned:6.2f}×" if baseline else "  none "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also part 2 (trains, minutes)")
    args = parser.parse_args()
    compare_layouts()
    if args.measure:
        measure_predictions()


def compare_layouts() -> None:
    clusters = [
        (load_cluster("cluster/aws_hetero.yaml"), "fp16"),
        (cluster("a100x8+l4x8", {"a100": ("p4d.24xlarge", 1), "l4": ("g6.48xlarge", 1)}), "bf16"),
        (
            cluster(
                "h100x8+a10gx8+l4x4",
                {"h100": ("p5.48xlarge", 1), "a10g": ("g5.48xlarge", 1), "l4": ("g6.24xlarge", 1)},
            ),
            "bf16",
        ),
    ]
    print(
        f"{'cluster':20s} {'model':5s} {'planned step':>12s} {'tokens/s':>10s}  "
        f"{'uniform/plan':>12s} {'homog./plan':>11s} {'plan time':>9s}  chosen layout"
    )
    for spec, precision in clusters:
        for model in MODELS:
            work = job(model, precision)
            started = time.perf_counter()
            try:
                found = candidates(work, spec)
            except ResourceError as error:
                print(f"{spec.name:20s} {model:5s} cannot plan: {error}")
                continue
            planning = time.perf_counter() - started
            planned = best_seconds(found)
            if planned is None:
                print(f"{spec.name:20s} {model:5s} nothing fits: {found[0].rejected}")
                continue
            chosen = next(c for c in found if c.plan is not None)
            uniform = best_seconds(candidates(work, spec, even_splits=True, every_device=True))
            subsets = [best_seconds(candidates(work, part)) for part in homogeneous(spec)]
            subset = min((s for s in subsets if s), default=None)
            print(
                f"{spec.name:20s} {model:5s} {planned * 1000:10.0f}ms "
                f"{chosen.plan.estimate.tokens_per_second:10,.0f}  {ratio(uniform, planned):>12s} "
                f"{ratio(subset, planned):>11s} {planning:8.2f}s  {chosen.summary}"
            )


MEASURED_LAYOUTS = {
    "ZeRO-1, micro 8": {"zero_stage": 1, "micro_batch_size": 8},
    "ZeRO-1, micro 4": {"zero_stage": 1, "micro_batch_size": 4, "gradient_accumulation": 4},
    "ZeRO-3, micro 8": {"zero_stage": 3, "micro_batch_size": 8},
    "ZeRO-0, micro 16": {"zero_stage": 0, "micro_batch_size": 16, "gradient_accumulation": 1},
    "pipeline 2, micro 4": {
        "zero_stage": 1,
        "pipeline_stages": 2,
        "micro_batch_size": 4,
        "gradient_accumulation": 8,
    },
}


def measure_predictions(steps: int = 30) -> None:
    """Predicted (profiled time model) against measured step time for real runs here."""
    from shipyard.plan.plan import make_plan
    from shipyard.runtime.local import start_local_ray
    from shipyard.spec.cluster import local_cluster
    from shipyard.train.profiler import profile_cluster
    from shipyard.train.trainer import run_training

    storage = tempfile.mkdtemp(prefix="shipyard-planner-bench-")
    start_local_ray(logging_level=logging.WARNING, log_to_driver=False)
    profile, overheads = None, {}
    for stage in sorted({train.get("zero_stage", 1) for train in MEASURED_LAYOUTS.values()}):
        (measured,), _ = profile_cluster(
            local_job("profile", storage, {"zero_stage": stage}), local_cluster()
        )
        profile = profile or measured
        overheads.update(measured.engine_overhead)
    profile = dataclasses.replace(profile, engine_overhead=overheads)
    print(
        f"\nCPU worker profile (in Ray Train workers): efficiency {profile.efficiency:.3f} of "
        f"{profile.threads}-thread peak, half at {profile.half_efficiency_tokens:.0f} tokens; "
        "DeepSpeed beyond the math: "
        + ", ".join(
            f"ZeRO-{stage} {o['micro_step'] * 1000:.0f}/{o['step'] * 1000:.0f} ms"
            for stage, o in sorted(overheads.items())
        )
        + " (accumulating/stepping micro-step)"
    )
    print(f"{'layout':22s} {'predicted':>10s} {'measured':>10s} {'error':>7s}")
    errors = []
    for name, train in [*MEASURED_LAYOUTS.items(), *list(MEASURED_LAYOUTS.items())[:1]]:
        job = local_job(name, storage, {**train, "max_steps": steps})
        job = job.model_copy(update={"name": f"{job.name}-{len(errors)}"})
        predicted = make_plan(job, local_cluster(), {profile.key: profile}).estimate.step_seconds
        result = run_training(job)
        # Windows of log_every steps; the last one also pays for evaluation and a checkpoint.
        measured = statistics.median(row["step_time_s"] for row in result.history[1:-1])
        errors.append((predicted - measured) / measured)
        again = " (again: run-to-run noise)" if len(errors) > len(MEASURED_LAYOUTS) else ""
        print(
            f"{name:22s} {predicted * 1000:8.0f}ms {measured * 1000:8.0f}ms "
            f"{errors[-1]:+7.0%}{again}"
        )
    print(f"largest error {max(map(abs, errors)):.0%} (goal within ±15%)")


def local_job(name: str, storage: str, train: dict) -> JobSpec:
    """jobs/tiny-gpt.yaml's model on 2 CPU workers, with `train` changes."""
    return JobSpec.model_validate(
        {
            "name": name.replace(" ", "-").replace(",", ""),
            "model": {"layers": 4, "heads": 4, "width": 128, "sequence_length": 128},
            "data": {"max_bytes": 1_000_000},
            "train": {
                "num_workers": 2,
                "cpus_per_worker": 0.5,
                "micro_batch_size": 8,
                "gradient_accumulation": 2,
                "log_every": 5,
                "eval_every": 1000,
                "checkpoint_every": 1000,
                **train,
            },
            "storage": storage,
        }
    )


if __name__ == "__main__":
    main()
