"""Tensor parallelism's memory and speed: one GPT at tp=1 (one worker), tp=2 (two workers, one
replica) and, for scale, dp=2 (two workers, two replicas), same global batch, in one run.

Prints each rank's parameter bytes, from the very modules a rank builds (goal: a transformer
block's parameters ≈ 0.5 per rank at tp=2), and the throughput ratios tp=2 ÷ tp=1 (what
splitting the layers over a second worker buys) and tp=2 ÷ dp=2 (what it costs against
replicating them, when the model fits one worker). Both are bounded here by gloo on 2 CPU
cores; on GPUs over NVLink the all-reduces inside every block are far cheaper.

    .venv/bin/python benchmarks/tensor_parallel.py [--width 512] [--steps 40]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from shipyard.models.gpt import GPT, Block
from shipyard.models.tensor_parallel import TensorParallel
from shipyard.spec.job import JobSpec
from shipyard.spec.load import validate

WARMUP_STEPS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="timed steps after warm-up")
    args = parser.parse_args()
    jobs = {
        "tp=1": benchmark_job(args, 1, 1),
        "tp=2": benchmark_job(args, 2, 2),
        "dp=2": benchmark_job(args, 2, 1),
    }

    model = jobs["tp=1"].model
    whole, shards = parameter_bytes(model, 1)[0], parameter_bytes(model, 2)
    whole_block = block_bytes(model, 1)
    print(
        f"GPT width {model.width}, {model.layers} blocks, {model.heads} heads: "
        f"{whole / 2**20:.1f} MiB of fp32 parameters"
    )
    for rank, held in enumerate(shards):
        print(
            f"tp=2 rank {rank}: {held / 2**20:.1f} MiB ({held / whole:.3f} of the model); "
            f"a block {block_bytes(model, 2, rank) / whole_block:.3f} of its parameters "
            "(goal ≈ 0.5)"
        )

    speed = {name: throughput(job) for name, job in jobs.items()}
    for name, tokens in speed.items():
        print(f"{name}: {tokens:,.0f} tokens/s on {jobs[name].train.num_workers} worker(s)")
    print(f"throughput ratio tp2/tp1: {speed['tp=2'] / speed['tp=1']:.3f}")
    print(f"throughput ratio tp2/dp2: {speed['tp=2'] / speed['dp=2']:.3f}")


def benchmark_job(args, workers: int, tensor_parallel: int) -> JobSpec:
    """8 sequences per step: one micro-batch of 8, or 4 on each of two replicas."""
    total = WARMUP_STEPS + args.steps
    replicas = workers // tensor_parallel
    document = {
        "name": f"w{workers}-tp{tensor_parallel}",
        "storage": tempfile.mkdtemp(prefix="shipyard-tp-bench-"),
        "model": {
            "layers": args.layers,
            "heads": 8,
            "width": args.width,
            "sequence_length": 128,
        },
        "data": {"max_bytes": 2_000_000},
        "train": {
            "num_workers": workers,
            "tensor_parallel": tensor_parallel,
            "cpus_per_worker": 1.0,
            "zero_stage": 1,
            "micro_batch_size": 8 // replicas,
            "gradient_accumulation": 1,
            "max_steps": total,
            "log_every": 5,
            "eval_every": total,
            "checkpoint_every": total,
        },
        "failure": {"max_failures": 0},
    }
    return validate(JobSpec, document, source="<tensor parallel benchmark>")


def parameter_bytes(model, tensor_parallel: int) -> list[int]:
    """Each rank's parameter bytes, from the GPT that rank builds."""
    return [
        sum(
            p.numel() * p.element_size()
            for p in GPT(model, 0, TensorParallel(size=tensor_parallel, rank=rank)).parameters()
        )
        for rank in range(tensor_parallel)
    ]


def block_bytes(model, tensor_parallel: int, rank: int = 0) -> int:
    block = Block(model, 0, TensorParallel(size=tensor_parallel, rank=rank))
    return sum(p.numel() * p.element_size() for p in block.parameters())


def throughput(job: JobSpec) -> float:
    """Median tokens/s over the log windows after warm-up, excluding the last (its closing
    evaluation and checkpoint)."""
    from shipyard.runtime.local import ray_runtime
    from shipyard.train.trainer import run_training

    with ray_runtime():
        result = run_training(job)
    rows = [r for r in result.history if WARMUP_STEPS < r["step"] < job.train.max_steps]
    return statistics.median(r["tokens_per_s"] for r in rows)


if __name__ == "__main__":
    main()
