"""Serving throughput and latency on Ray Serve's OpenAI API, batched vs unbatched, streamed,
and against in-process baselines.

A bounded closed-loop load: `concurrency` clients each send their share of `--requests` greedy
requests (`--new-tokens` each) to /v1/completions on 127.0.0.1, one after another; the clients
share the machine's 2 cores with Serve. The same model is deployed with continuous batching
(max batch 16) and without (max batch 1). Prints requests/s, p50/p99 latency, the ratio
batched ÷ unbatched at concurrency 16 (goal ≥ 3); streamed, the time to first token and the
inter-token latency (p50, p99) at concurrency 1 and 16; Serve's latency overhead over calling
the model in-process at concurrency 1 (goal ≤ 2 ms p50); and tokens/s at concurrency 16 against
`transformers`' own batched `generate` of the same prompts from the same export (goal ≥ 1×).

    .venv/bin/python benchmarks/serve_load.py [--job jobs/tiny-gpt.yaml] [--requests 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shipyard.models.gpt import GPT
from shipyard.models.gpt.generation import GenerationRequest, TextGenerator
from shipyard.runtime.local import start_local_ray
from shipyard.serve.deployment import Service, deploy, stop_serve
from shipyard.serve.export import (
    ExportedModel,
    export_checkpoint,
    load_exported_model,
    write_export,
)
from shipyard.spec.job import JobSpec, ServeSpec
from shipyard.spec.load import load_job
from shipyard.train.checkpoint import latest_checkpoint

PROMPTS = ["def main():", "import os\n", "class Parser:", "for line in ", "return self.", "# "]
CONCURRENCY = (1, 4, 16)
MODEL = "bench"  # the Serve app's name, and so the model's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/tiny-gpt.yaml")
    parser.add_argument("--requests", type=int, default=96, help="requests per measurement")
    parser.add_argument("--new-tokens", type=int, default=96, help="tokens generated per request")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds")
    args = parser.parse_args()
    job = load_job(args.job)
    import ray

    start_local_ray(logging_level=logging.WARNING, log_to_driver=False)  # as `shipyard serve`
    try:
        with tempfile.TemporaryDirectory() as scratch:
            export = model_to_serve(job, Path(scratch))
            run(job, export, args.requests, args.new_tokens, args.rounds)
    finally:
        stop_serve()
        ray.shutdown()


def model_to_serve(job: JobSpec, scratch: Path) -> ExportedModel:
    """The job's latest checkpoint if it was trained, else its untrained model (same speed)."""
    checkpoint = latest_checkpoint(job.storage, job.name)
    if checkpoint is not None:
        print(f"model: {job.name} step {checkpoint.step}")
        return export_checkpoint(checkpoint)
    print(f"model: {job.name}, untrained (run `make run` to serve trained weights)")
    state = GPT(job.model, job.train.seed).state_dict()
    return write_export(scratch / "export", state, job.model, job.name, step=0)


def run(job: JobSpec, export: ExportedModel, total: int, new_tokens: int, rounds: int) -> None:
    """Alternate batched and unbatched rounds, so slow spells of a shared machine hit both."""
    directs, ratios, overheads, versus = [], [], [], []
    for round_number in range(1, rounds + 1):
        print(f"round {round_number}")
        direct = direct_latency(export, new_tokens, count=20)
        results = {
            label: measure(job, export, batch, total, new_tokens)
            for label, batch in (("batched", 16), ("unbatched", 1))
        }
        directs.append(direct)
        ratios.append(results["batched"][16][0] / results["unbatched"][16][0])
        overheads.append(results["unbatched"][1][1] - direct)
        print(f"  direct call, one request: p50 {direct * 1000:7.1f} ms")
        baseline = transformers_throughput(export, new_tokens, batch=16)
        served = results["batched"][16][0] * new_tokens
        versus.append(served / baseline)
        print(
            f"  tokens/s at concurrency 16: Serve {served:7.0f}, transformers' batched "
            f"generate {baseline:7.0f} in-process"
        )
    print(
        "throughput batched/unbatched at concurrency 16: "
        f"{' / '.join(f'{r:.2f}x' for r in ratios)} per round, median "
        f"{statistics.median(ratios):.2f}x  (goal >= 3)"
    )
    overhead, direct = statistics.median(overheads), statistics.median(directs)
    print(
        f"Serve latency overhead at concurrency 1: {overhead * 1000:.1f} ms median "
        f"({(direct + overhead) / direct:.2f}x the direct call; goal <= 2 ms)"
    )
    print(
        "Serve ÷ transformers' batched generate, tokens/s at concurrency 16: "
        f"{' / '.join(f'{r:.2f}x' for r in versus)} per round (goal >= 1)"
    )


def measure(
    job: JobSpec, export: ExportedModel, max_batch_size: int, total: int, new_tokens: int
) -> dict[int, tuple[float, float, float, float]]:
    """Deploy with this max batch size and run the closed loop at every concurrency."""
    spec = ServeSpec(
        port=job.serve.port,
        num_replicas=1,
        cpus_per_replica=1.0,
        max_batch_size=max_batch_size,
    )
    service = Service("bench", export, spec)
    deploy(service)
    label = "batched" if max_batch_size > 1 else "unbatched"
    results = {}
    for concurrency in CONCURRENCY:
        results[concurrency] = closed_loop(service.url, concurrency, total, new_tokens)
        throughput, p50, p99, batch_size = results[concurrency]
        print(
            f"  {label:9s} concurrency {concurrency:2d}: {throughput:6.1f} req/s  "
            f"p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms  mean batch {batch_size:4.1f}"
        )
    if max_batch_size > 1:
        for concurrency in (1, 16):
            first, gaps = asyncio.run(_streams(service.url, concurrency, total, new_tokens))
            print(
                f"  streamed  concurrency {concurrency:2d}: time to first token p50 "
                f"{_ms(first, 50)} p99 {_ms(first, 99)}, inter-token p50 {_ms(gaps, 50)} "
                f"p99 {_ms(gaps, 99)}"
            )
    return results


def _ms(values: list[float], percentile: int) -> str:
    return f"{np.percentile(values, percentile) * 1000:6.1f} ms"


async def _streams(
    url: str, concurrency: int, total: int, new_tokens: int
) -> tuple[list[float], list[float]]:
    """Times to the first streamed text and between text events, over `total` streams."""
    import aiohttp

    firsts, gaps = [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def stream(index: int) -> None:
            start = last = time.perf_counter()
            seen = False
            async with session.post(
                f"{url}/v1/completions", json=body(index, new_tokens, stream=True)
            ) as response:
                response.raise_for_status()
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    now = time.perf_counter()
                    if not json.loads(line[6:])["choices"][0]["text"]:
                        continue
                    (gaps if seen else firsts).append(now - (last if seen else start))
                    seen, last = True, now

        async def client(first: int) -> None:
            for index in range(first, total, concurrency):
                await stream(index)

        await stream(0)
        firsts.clear()  # the warm-up stream does not count
        gaps.clear()
        await asyncio.gather(*(client(first) for first in range(concurrency)))
    return firsts, gaps


def transformers_throughput(export: ExportedModel, new_tokens: int, batch: int) -> float:
    """Tokens/s of transformers' own batched greedy `generate` over `batch` of the benchmark's
    prompts (left-padded), from the same export, on one thread like a one-CPU replica."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(export.folder, local_files_only=True).eval()
    prompts = [list(PROMPTS[i % len(PROMPTS)].encode()) for i in range(batch)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        timings.append(time.perf_counter() - start)
    return batch * new_tokens / statistics.median(timings)


def direct_latency(export: ExportedModel, new_tokens: int, count: int) -> float:
    """Median seconds for one request through the model in this process, no Serve, no HTTP.

    One thread, as a replica with one CPU gets (Ray sets OMP_NUM_THREADS from num_cpus).
    """
    torch.set_num_threads(1)
    generator = TextGenerator(load_exported_model(export), export.model.sequence_length)
    timings = []
    for index in range(count):
        request = GenerationRequest(tuple(PROMPTS[index % len(PROMPTS)].encode()), new_tokens)
        start = time.perf_counter()
        generator.generate([request])
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def closed_loop(
    url: str, concurrency: int, total: int, new_tokens: int
) -> tuple[float, float, float, float]:
    """Requests/s, p50 and p99 seconds, and the mean batch size, for `total` requests.

    One asyncio client (aiohttp) keeps `concurrency` requests in flight: lighter on the shared
    cores than a thread per client.
    """
    return asyncio.run(_closed_loop(url, concurrency, total, new_tokens))


async def _closed_loop(
    url: str, concurrency: int, total: int, new_tokens: int
) -> tuple[float, float, float, float]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def post(index: int) -> tuple[float, int]:
            start = time.perf_counter()
            async with session.post(
                f"{url}/v1/completions", json=body(index, new_tokens)
            ) as response:
                response.raise_for_status()
                answer = await response.json()
            return time.perf_counter() - start, answer["shipyard"]["batch_size"]

        async def client(first: int) -> list[tuple[float, int]]:
            return [await post(index) for index in range(first, total, concurrency)]

        await post(0)  # warm the connection and the replica
        start = time.perf_counter()
        parts = await asyncio.gather(*(client(first) for first in range(concurrency)))
        elapsed = time.perf_counter() - start
    measured = [row for part in parts for row in part]
    latencies = [latency for latency, _ in measured]
    return (
        total / elapsed,
        float(np.percentile(latencies, 50)),
        float(np.percentile(latencies, 99)),
        float(np.mean([batch for _, batch in measured])),
    )


def body(index: int, new_tokens: int, stream: bool = False) -> dict:
    prompt = PROMPTS[index % len(PROMPTS)]
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": stream,
    }


if __name__ == "__main__":
    main()
