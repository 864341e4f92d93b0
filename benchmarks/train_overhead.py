"""Shipyard's steady-state training throughput vs a hand-written DeepSpeed loop, in one run.

Both sides train the same model with the same DeepSpeed config, process count and threads per
process on the same byte windows; only the launcher differs (torch.multiprocessing vs Ray Train
with Ray Data, metrics and the Shipyard loop). For a Hugging Face job the baseline trains the
transformers model itself (`AutoModelForCausalLM.from_config`, `use_cache=False`), Shipyard its
pieces of it. Prints the ratio Shipyard ÷ baseline (goal ≥ 0.97), and where the machine's
CPU went during Shipyard's timed steps, process by process (the ranks, and everything Ray
runs beside them), and how long the run took to start, phase by phase.

    .venv/bin/python benchmarks/train_overhead.py [--job jobs/tiny-gpt.yaml] [--steps 60]
    .venv/bin/python benchmarks/train_overhead.py --larger   # 2x the width and layers: 8x
    .venv/bin/python benchmarks/train_overhead.py --job jobs/tiny-llama.yaml
    .venv/bin/python benchmarks/train_overhead.py --warm   # on a sweep's warm ranks instead
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.multiprocessing as mp

from shipyard.data.batches import TokenStream, replica_slices, training_batches
from shipyard.data.corpus import local_corpus, prepare_corpus
from shipyard.models import model_family
from shipyard.models.family import seeded
from shipyard.models.loss import language_model_loss
from shipyard.plan.devices import cpu_threads
from shipyard.plan.plan import make_plan
from shipyard.runtime.local import free_port
from shipyard.spec.job import JobSpec
from shipyard.spec.load import load_job
from shipyard.train.deepspeed_config import deepspeed_config
from shipyard.train.schedule import lr_factor

WARMUP_STEPS = 10


def main() -> None:
    # Imported here, not at the top: each spawned baseline process imports this module.
    from shipyard.train.trainer import START_PARTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/tiny-gpt.yaml")
    parser.add_argument("--steps", type=int, default=60, help="timed steps after warm-up")
    parser.add_argument(
        "--larger", action="store_true", help="twice the width and layers (8x the parameters)"
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="train Shipyard's side on warm ranks, as a sweep trial does, not a Ray Train run",
    )
    args = parser.parse_args()
    job = benchmark_job(load_job(args.job), args.steps, args.larger)
    plan = make_plan(job)
    print(
        f"{job.name}: {plan.num_workers} processes, ZeRO {plan.zero_stage}, "
        f"global batch {plan.global_batch_size}, {args.steps} timed steps"
    )

    baseline_first = baseline_throughput(job, args.steps)
    shipyard, cpu, start = shipyard_throughput(job, args.warm)
    baseline_second = baseline_throughput(job, args.steps)
    baseline = (baseline_first + baseline_second) / 2

    print(f"baseline DeepSpeed loop : {baseline_first:,.0f} / {baseline_second:,.0f} tokens/s")
    launcher = "warm ranks" if args.warm else "Ray Train"
    print(f"{f'shipyard ({launcher})':24s}: {shipyard:,.0f} tokens/s")
    print(f"ratio shipyard/baseline : {shipyard / baseline:.3f}  (goal >= 0.97)")
    print(f"CPU during Shipyard's timed steps, % of one core ({psutil.cpu_count()} cores):")
    for name, share in cpu:
        print(f"  {share * 100:6.1f}  {name}")
    print(
        "start, s: "
        + ", ".join(f"{part} {start[f'start_{part}_s']:.1f}" for part in START_PARTS)
        + f" = {start['start_s']:.1f} to the first step done"
    )


def benchmark_job(job: JobSpec, steps: int, larger: bool = False) -> JobSpec:
    """The job with pipelines off, no eval or checkpoint inside the timed window, fresh storage
    (`larger`: twice the width and layers)."""
    total = WARMUP_STEPS + steps
    if larger:
        model = job.model.model_copy(
            update={"width": job.model.width * 2, "layers": job.model.layers * 2}
        )
        job = job.model_copy(update={"model": model})
    train = job.train.model_copy(
        update={
            "max_steps": total,
            "log_every": 10,
            "eval_every": total,
            "checkpoint_every": total,
            "warmup_steps": 0,
            "pipeline_stages": 1,
        }
    )
    storage = tempfile.mkdtemp(prefix="shipyard-bench-")
    return job.model_copy(update={"train": train, "storage": storage, "name": "overhead"})


def shipyard_throughput(
    job: JobSpec, warm: bool = False
) -> tuple[float, list[tuple[str, float]], dict]:
    """Median tokens/s over Shipyard's log windows after warm-up (the final window is excluded:
    it includes the closing evaluation and checkpoint); the CPU each process used from the end
    of warm-up to the last such window; the run's first row (its start breakdown)."""
    from shipyard.runtime.local import ray_runtime
    from shipyard.train.trainer import run_training

    last_window = job.train.max_steps - job.train.log_every
    samples: dict[int, tuple[float, dict]] = {}

    def sample(row: dict) -> None:
        if row["step"] in (WARMUP_STEPS, last_window):
            samples[row["step"]] = (time.perf_counter(), cpu_seconds())

    with ray_runtime():
        from shipyard.train.warm_ranks import start_rank_pool, stop_rank_pool

        ranks = start_rank_pool(1) if warm else None
        try:
            result = run_training(job, on_metrics=sample, ranks=ranks)
        finally:
            if ranks is not None:
                stop_rank_pool(ranks)
    rows = [r for r in result.history if WARMUP_STEPS < r["step"] < job.train.max_steps]
    throughput = statistics.median(r["tokens_per_s"] for r in rows)
    return throughput, cpu_shares(samples[WARMUP_STEPS], samples[last_window]), result.history[0]


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process's name and CPU seconds so far."""
    seconds = {}
    for process in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        times, command = process.info["cpu_times"], process.info["cmdline"]
        if times is not None:
            seconds[process.pid] = (
                _short_name(command, process.info["name"]),
                times.user + times.system,
            )
    return seconds


def cpu_shares(start, end, top: int = 12) -> list[tuple[str, float]]:
    """Each kind of process's CPU between two `cpu_seconds` samples, as a share of one core,
    the biggest first; the rest summed."""
    (began, before), (ended, after) = start, end
    shares: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        used = seconds - before.get(pid, (name, 0.0))[1]
        shares[name] = shares.get(name, 0.0) + used / (ended - began)
    ranked = sorted(shares.items(), key=lambda item: -item[1])
    rest = sum(share for _, share in ranked[top:])
    return [*ranked[:top], ("everything else", rest), ("all", sum(shares.values()))]


def _short_name(command: list[str] | None, name: str) -> str:
    """`ray::TrainController`, `gcs_server`, `python log_monitor.py`: what the process is."""
    if not command:
        return name
    if command[0].startswith("ray::"):
        return command[0].split()[0].split(".")[0]
    scripts = [Path(part).name for part in command[1:3] if part.endswith(".py")]
    return f"{Path(command[0]).name} {scripts[0]}" if scripts else Path(command[0]).name


def baseline_throughput(job: JobSpec, steps: int) -> float:
    """Tokens/s of a plain DeepSpeed loop launched with torch.multiprocessing, no Ray."""
    windows = local_windows(job)
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "tokens_per_s"
        mp.spawn(
            baseline_worker,
            args=(job, windows, steps, port, str(result)),
            nprocs=job.train.num_workers,
            join=True,
        )
        return float(result.read_text())


def baseline_worker(
    rank: int, job: JobSpec, windows: TokenStream, steps: int, port: int, result: str
) -> None:
    import deepspeed

    plan = make_plan(job)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(plan.num_workers),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(cpu_threads(plan.cpus_per_worker))  # as Ray gives its workers
    deepspeed.init_distributed(dist_backend="gloo")
    model, logits = baseline_model(job)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=deepspeed_config(plan, job.train),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, job.train)
        ),
    )
    # The same global batches Shipyard's workers draw, this rank's slice of each.
    mine = replica_slices((plan.micro_batch_size,) * plan.data_parallel_size)[rank]
    batches = training_batches(
        windows, plan.micro_batch_size * plan.data_parallel_size, job.train.seed, rows=mine
    )

    def step() -> None:
        for _ in range(plan.gradient_accumulation):
            tokens = next(batches)
            loss = language_model_loss(logits(engine, tokens[:, :-1]), tokens[:, 1:])
            engine.backward(loss)
            engine.step()

    for _ in range(WARMUP_STEPS):
        step()
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.distributed.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        tokens = steps * plan.global_batch_size * job.model.sequence_length
        Path(result).write_text(str(tokens / seconds))
    torch.distributed.destroy_process_group()


def baseline_model(job: JobSpec):
    """The model a hand-written loop would train, and how it gets logits from it."""
    if job.model.type == "huggingface":
        from transformers import AutoModelForCausalLM

        with seeded(job.train.seed):
            model = AutoModelForCausalLM.from_config(model_family(job.model).config)
        return model, lambda engine, tokens: engine(input_ids=tokens, use_cache=False).logits
    return model_family(job.model).build(job.train.seed), lambda engine, tokens: engine(tokens)


def local_windows(job: JobSpec) -> TokenStream:
    """The training windows Shipyard prepared (the corpus is cached on the job's storage); the
    baseline reads them from disk without Ray."""
    from shipyard.runtime.local import ray_runtime

    with ray_runtime():
        corpus = prepare_corpus(job)
    folder = local_corpus(corpus)
    return TokenStream(folder / "train.bin", corpus.dtype, job.model.sequence_length)


if __name__ == "__main__":
    main()
