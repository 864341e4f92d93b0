"""Serving throughput and latency on Ray Serve, batched vs unbatched, and Serve's own overhead.

A bounded closed-loop load: `concurrency` clients each send their share of `--requests` greedy
requests to 127.0.0.1, one after another. The same model is deployed with dynamic batching
(max batch 16) and without (max batch 1); the model is also called in-process for the baseline.
Prints requests/s, p50/p99 latency, the ratio batched ÷ unbatched at concurrency 16 (goal ≥ 3)
and Serve's latency overhead over a direct call at concurrency 1.

    .venv/bin/python benchmarks/serve_load.py [--job jobs/tiny-gpt.yaml] [--requests 96]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from shipyard.models.gpt import GPT
from shipyard.serve.deployment import Service, deploy, stop_serve
from shipyard.serve.export import (
    ExportedModel,
    export_checkpoint,
    load_exported_model,
    write_export,
)
from shipyard.serve.generation import GenerationRequest, TextGenerator
from shipyard.spec.job import JobSpec, ServeSpec
from shipyard.spec.load import load_job
from shipyard.train.checkpoint import latest_checkpoint

PROMPTS = ["def main():", "import os\n", "class Parser:", "for line in ", "return self.", "# "]
NEW_TOKENS = 32
CONCURRENCY = (1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/tiny-gpt.yaml")
    parser.add_argument("--requests", type=int, default=96, help="requests per measurement")
    args = parser.parse_args()
    job = load_job(args.job)
    import ray

    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            export = model_to_serve(job, Path(scratch))
            run(job, export, args.requests)
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


def run(job: JobSpec, export: ExportedModel, total: int) -> None:
    direct = direct_latency(export, count=20)
    print(f"direct call, one request : p50 {direct * 1000:7.1f} ms")
    results = {}
    for label, batch in (("batched", 16), ("unbatched", 1)):
        spec = ServeSpec(
            port=job.serve.port,
            num_replicas=1,
            cpus_per_replica=1.0,
            max_batch_size=batch,
            max_ongoing_requests=32,
        )
        service = Service("bench", export, spec)
        deploy(service)
        for concurrency in CONCURRENCY:
            results[label, concurrency] = closed_loop(service.url, concurrency, total)
            throughput, p50, p99 = results[label, concurrency]
            print(
                f"{label:9s} concurrency {concurrency:2d}: {throughput:6.1f} req/s  "
                f"p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms"
            )
    ratio = results["batched", 16][0] / results["unbatched", 16][0]
    overhead = results["unbatched", 1][1] - direct
    print(f"throughput batched/unbatched at concurrency 16: {ratio:.2f}x  (goal >= 3)")
    print(
        f"Serve latency overhead at concurrency 1: {overhead * 1000:.1f} ms "
        f"({results['unbatched', 1][1] / direct:.2f}x the direct call)"
    )


def direct_latency(export: ExportedModel, count: int) -> float:
    """Median seconds for one request through the model in this process, no Serve, no HTTP."""
    generator = TextGenerator(load_exported_model(export), export.model.sequence_length)
    timings = []
    for index in range(count):
        request = GenerationRequest(tuple(PROMPTS[index % len(PROMPTS)].encode()), NEW_TOKENS)
        start = time.perf_counter()
        generator.generate([request])
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def closed_loop(url: str, concurrency: int, total: int) -> tuple[float, float, float]:
    """Requests/s, p50 and p99 seconds for `total` requests from `concurrency` clients."""
    warm = requests.post(f"{url}/v1/generate", json=body(0), timeout=60)
    warm.raise_for_status()

    def client(first: int) -> list[float]:
        session, latencies = requests.Session(), []
        for index in range(first, total, concurrency):
            start = time.perf_counter()
            response = session.post(f"{url}/v1/generate", json=body(index), timeout=120)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [t for part in pool.map(client, range(concurrency)) for t in part]
    elapsed = time.perf_counter() - start
    return total / elapsed, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def body(index: int) -> dict:
    return {"prompt": PROMPTS[index % len(PROMPTS)], "max_new_tokens": NEW_TOKENS}


if __name__ == "__main__":
    main()
