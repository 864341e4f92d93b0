"""DeepSpeed's own time on this machine, beyond the model's math (part of `--profile`).

On a small model the engine's bookkeeping — hooks, gradient buckets, ZeRO's partition and
gather calls, the optimizer step — costs as much as the forward and backward. The FLOP-based
time model cannot know it, so `--profile` runs the job's model in a 2-rank DeepSpeed engine
(gloo, the job's ZeRO stage, two micro-batches per step) and times what each micro-step takes
beyond the same model's plain forward and backward: `micro_step` for a micro-step that only
accumulates, `step` for the one that also reduces gradients and steps the optimizer. The block
curve is timed there too, with both ranks computing, as in training: CPU workers share caches
and memory bandwidth, which an idle single process does not see.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from shipyard.runtime.local import free_port
from shipyard.spec.job import JobSpec

RANKS = 2
TIMED_STEPS = 6
WARMUP_STEPS = 2


def measure_engine_overhead(job: JobSpec, threads: int) -> dict:
    """Seconds beyond the math per accumulating micro-step ("micro_step") and per optimizer
    step ("step"), and the block's seconds per micro-batch size measured alongside."""
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "overhead.json"
        mp.spawn(
            _rank,
            args=(job.model_dump(mode="json"), threads, free_port(), str(result)),
            nprocs=RANKS,
            join=True,
        )
        measured = json.loads(result.read_text())
    measured["block_seconds"] = {int(m): t for m, t in measured["block_seconds"].items()}
    return measured


def _rank(rank: int, job_data: dict, threads: int, port: int, result: str) -> None:
    import json

    import deepspeed
    import torch

    from shipyard.models.gpt import GPT, language_model_loss
    from shipyard.plan.plan import make_plan
    from shipyard.plan.profile import block_seconds
    from shipyard.train.deepspeed_config import deepspeed_config

    job = JobSpec.model_validate(job_data)
    train = job.train.model_copy(
        update={
            "num_workers": RANKS,
            "pipeline_stages": 1,
            "gradient_accumulation": 2,
            "global_batch_size": None,
        }
    )
    job = job.model_copy(update={"train": train})
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(RANKS),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    micro = train.micro_batch_size
    tokens = torch.randint(0, job.model.vocabulary_size, (micro, job.model.sequence_length + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    deepspeed.init_distributed(dist_backend="gloo")
    torch.distributed.barrier()
    block = block_seconds(job, "cpu", threads)  # while the other rank computes too
    torch.distributed.barrier()
    plain = GPT(job.model, train.seed)
    math_only = _median(lambda: language_model_loss(plain(inputs), targets).backward())

    model = GPT(job.model, train.seed)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=deepspeed_config(make_plan(job), train),
    )

    def micro_step() -> None:
        engine.backward(language_model_loss(engine(inputs), targets))
        engine.step()

    accumulating, stepping = [], []
    for index in range(2 * (WARMUP_STEPS + TIMED_STEPS)):
        torch.distributed.barrier()
        started = time.perf_counter()
        micro_step()
        if index >= 2 * WARMUP_STEPS:
            (stepping if index % 2 else accumulating).append(time.perf_counter() - started)
    if rank == 0:
        overhead = {
            "micro_step": max(statistics.median(accumulating) - math_only, 0.0),
            "step": max(statistics.median(stepping) - math_only, 0.0),
            "block_seconds": block,
        }
        Path(result).write_text(json.dumps(overhead))


def _median(run, repeats: int = 5) -> float:
    for _ in range(WARMUP_STEPS):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
