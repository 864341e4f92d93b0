"""The loop every rank runs: build the DeepSpeed engine, restore, train, report.

Read top-down: setup, restore, then one optimizer step after another. A step is
`gradient_accumulation` micro-batches; the data stream and the LR schedule are functions of the
step number alone, so a run restored from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray
import torch
import torch.distributed as dist

from shipyard.data.batches import (
    TokenStream,
    evaluation_batches,
    replica_slices,
    training_batches,
)
from shipyard.data.corpus import Corpus, local_corpus
from shipyard.errors import PlacementError
from shipyard.models.loss import language_model_loss
from shipyard.models.tensor_parallel import TensorParallel
from shipyard.plan.plan import ParallelPlan
from shipyard.spec.job import JobSpec
from shipyard.train.checkpoint import (
    CHECKPOINT_TAG,
    METADATA_FILE,
    TOKENIZER_FOLDER,
    weights_only_loads,
)
from shipyard.train.deepspeed_config import deepspeed_config
from shipyard.train.engine import (
    apply_hyperparameters,
    build_engine,
    tensor_parallel_group,
)
from shipyard.train.session import RankSession, RayTrainSession


@dataclass(frozen=True)
class Fault:
    """Kill world rank `rank` with os._exit once, right after optimizer step `step` (a drill).

    The rank first waits until its last reported checkpoint is committed, as a crash long after
    a checkpoint would; the restarted group must then resume from that checkpoint.
    """

    rank: int
    step: int
    marker: str  # a file that records the fault happened, so the restarted run is spared


def run_rank(config: dict[str, Any], session: RankSession | None = None) -> None:
    """Train as one rank of a Ray Train run (`shipyard.train.entry.train_loop`), or of
    `session`'s; `config` is plain data from the driver."""
    entered = time.time()
    session = session or RayTrainSession()
    job = JobSpec.model_validate(config["job"])
    plan = ParallelPlan.from_dict(config["plan"])
    fault = Fault(**config["fault"]) if config.get("fault") else None
    worker = Worker(
        job,
        plan,
        Corpus.from_dict(config["corpus"]),
        session=session,
        corpus_filesystem=config.get("corpus_filesystem"),
        stop_at_step=config.get("stop_at_step"),
        fault=fault,
        start_checkpoint=config.get("start_checkpoint"),
    )
    clock = StartClock(session.created_at() or entered, entered, ready=time.time())
    try:
        worker.run(clock)
    finally:
        worker.close()


@dataclass(frozen=True)
class StartClock:
    """When this rank's process was created, entered the loop and had its engine ready: the
    start breakdown its first report carries (`start_*` metrics)."""

    created: float
    entered: float
    ready: float

    def breakdown(self, first_step_done: float) -> dict[str, float]:
        return {
            "start_created_at": self.created,  # the driver makes it start_launch_s
            "start_imports_s": self.entered - self.created,  # Python, Ray, torch, DeepSpeed
            "start_setup_s": self.ready - self.entered,  # process group, engine, restore
            "start_first_step_s": first_step_done - self.ready,
        }


class Worker:
    """One rank's training state: engine, data stream and step counter."""

    def __init__(
        self,
        job: JobSpec,
        plan: ParallelPlan,
        corpus: Corpus,
        stop_at_step: int | None,
        fault: Fault | None,
        start_checkpoint: Any = None,  # a ray.train.Checkpoint
        corpus_filesystem: Any = None,
        session: RankSession | None = None,
    ):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.job, self.plan, self.fault = job, plan, fault
        self.session = session or RayTrainSession()
        self.train = job.train
        self.final_step = min(job.train.max_steps, stop_at_step or job.train.max_steps)
        self.tokens_per_step = plan.global_batch_size * job.model.sequence_length
        self.rank = self.session.world_rank()
        self.device = self.session.device(plan)
        self.pipelined = plan.pipeline_stages > 1
        deepspeed.init_distributed(dist_backend=plan.backend)
        self.tp = tensor_parallel_group(plan)  # collective: before anything else uses groups
        check_on_one_node(self.tp)
        self.placement = where_ranks_run(plan)
        # Raises alike on every rank if this placement cannot play the plan.
        roles = plan.roles(self.placement) if plan.select_nodes else None
        # This rank's replica and its share of every global micro-batch (the plan may give a
        # faster device more); its loss weight makes DeepSpeed's plain average over replicas
        # the average over all samples of the global batch.
        micro = plan.micro_batches
        self.global_micro_batch = sum(micro)
        # DeepSpeed's data coordinate: ranks are (stage, replica, tensor shard), the last fastest.
        replica = (self.rank // plan.tensor_parallel) % plan.data_parallel_size
        if roles and not self.pipelined:
            replica = roles[self.rank].replica
        self.slice = replica_slices(micro)[replica]
        self.sample_share = micro[replica] / self.global_micro_batch
        self.loss_weight = self.sample_share * plan.data_parallel_size
        config = deepspeed_config(plan, job.train, micro_batch_size=micro[replica])
        self.engine = build_engine(job, plan, config, self.tp)
        self.step = self._restore(start_checkpoint)
        # Streamed from this machine's disk (downloaded once per machine from S3).
        folder = local_corpus(corpus, corpus_filesystem)
        length = job.model.sequence_length
        self.train_stream = TokenStream(folder / "train.bin", corpus.dtype, length)
        self.validation_stream = TokenStream(folder / "validation.bin", corpus.dtype, length)
        self.tokenizer = corpus.tokenizer
        self.corpus_key = corpus.key

    def run(self, clock: StartClock | None = None) -> None:
        """Train until the final step, reporting metrics and checkpoints on the job's cadence.
        The first report says how long this run took to start (`clock`)."""
        if self.step >= self.final_step:
            metrics = {"step": self.step, "already_complete": True, **self._evaluate()}
            self.session.report(metrics, None)
            return
        resumed_from = self.step
        batches = self._micro_batches()
        window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
        reported, first_step_done = False, 0.0
        while self.step < self.final_step:
            # Dropout: the ranks of one tensor-parallel group share the generator.
            torch.manual_seed(_step_seed(self.train.seed, self.step, self.rank // self.tp.size))
            window_loss += self._optimizer_step(batches)
            first_step_done = first_step_done or time.time()
            self.step += 1
            window_steps += 1
            self._maybe_fail()
            if not self.session.keep_going():
                return  # the run's owner is gone (a sweep trial stopped): leave with the rest
            if not self._is_report_step():
                continue
            now = time.perf_counter()
            # The window runs report to report, so evaluation and checkpoint costs count too.
            step_time, window_start = (now - window_start) / window_steps, now
            metrics = {
                "step": self.step,
                "loss": self._mean_over_replicas(window_loss / window_steps),
                "lr": self.engine.get_lr()[0],
                "step_time_s": step_time,
                "tokens_per_s": self.tokens_per_step / step_time,
                "epoch": self.step * self.plan.global_batch_size / self.train_stream.windows,
                "resumed_from_step": resumed_from,
                "rss_mib": psutil.Process().memory_info().rss / 2**20,  # this rank's host memory
            }
            if not reported:  # the first report of this run: where each rank runs, its start
                metrics["node_types"] = self.placement
                if clock:
                    metrics.update(clock.breakdown(first_step_done))
            if self.step % self.train.eval_every == 0 or self.step == self.final_step:
                metrics.update(self._evaluate())
            if not self._report(metrics):
                return  # the run's owner is gone (a sweep trial stopped): leave with the rest
            reported = True
            window_loss, window_steps = 0.0, 0

    def _optimizer_step(self, batches) -> float:
        """One optimizer step over `gradient_accumulation` micro-batches; returns the mean loss."""
        if self.pipelined:
            return float(self.engine.train_batch(batches))
        total = 0.0
        for _ in range(self.plan.gradient_accumulation):
            inputs, targets = next(batches)
            loss = language_model_loss(self.engine(inputs), targets, self.tp)
            self.engine.backward(loss * self.loss_weight)
            self.engine.step()
            total += loss.item()
        return total / self.plan.gradient_accumulation

    def _micro_batches(self):
        skip = self.step * self.plan.gradient_accumulation
        for tokens in training_batches(
            self.train_stream, self.global_micro_batch, self.train.seed, skip, rows=self.slice
        ):
            tokens = tokens.to(self.device)
            yield tokens[:, :-1], tokens[:, 1:]

    def _evaluate(self) -> dict[str, float]:
        mine = [
            tokens.to(self.device)
            for tokens in evaluation_batches(
                self.validation_stream,
                self.global_micro_batch,
                self.train.eval_batches,
                rows=self.slice,
            )
        ]
        batches = [(tokens[:, :-1], tokens[:, 1:]) for tokens in mine]
        if self.pipelined:
            loss = self.engine.eval_batch(iter(batches), num_micro_batches=len(batches))
            return {"val_loss": self._mean_over_replicas(float(loss), pipeline_output=True)}
        self.engine.eval()
        with torch.no_grad():
            losses = [language_model_loss(self.engine(x), y, self.tp).item() for x, y in batches]
        self.engine.train()
        return {"val_loss": self._mean_over_replicas(float(np.mean(losses)))}

    def _report(self, metrics: dict[str, Any]) -> bool:
        """Report, with a checkpoint when one is due; False once nobody wants the run."""
        checkpoint_due = (
            self.step % self.train.checkpoint_every == 0 or self.step == self.final_step
        )
        if not checkpoint_due:
            return self.session.report(metrics, None)
        # Each rank saves its own shard locally; the session stores all ranks' files as one
        # checkpoint, and counts it only once every rank's files are stored.
        folder = tempfile.mkdtemp(prefix="shipyard-checkpoint-")
        try:
            self.engine.save_checkpoint(
                folder, tag=CHECKPOINT_TAG, client_state={"step": self.step}
            )
            if self.rank == 0:
                _write_metadata(Path(folder), self.job, self.plan, metrics, self.corpus_key)
                # The tokenizer travels with every checkpoint, into every export.
                self.tokenizer.save(Path(folder) / TOKENIZER_FOLDER, self.job.model.sequence_length)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return self.session.report(metrics, folder)

    def close(self) -> None:
        """Free the engine now: a warm rank trains the next trial in this process."""
        destroy = getattr(self.engine, "destroy", None)
        if destroy:
            destroy()
        del self.engine

    def _restore(self, start_checkpoint) -> int:
        """The step to continue from: this run's own latest checkpoint, else `start_checkpoint`
        (a sweep trial continuing another trial's checkpoint), else a fresh start at 0."""
        checkpoint = self.session.own_checkpoint() or start_checkpoint
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as folder, weights_only_loads(checkpoint.path):
            # (as_directory downloads the checkpoint first if it is on S3)
            _, client_state = self.engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        apply_hyperparameters(self.engine, self.train)
        return int(client_state["step"])

    def _is_report_step(self) -> bool:
        return (
            self.step % self.train.log_every == 0
            or self.step % self.train.checkpoint_every == 0
            or self.step == self.final_step
        )

    def _mean_over_replicas(self, value: float, pipeline_output: bool = False) -> float:
        """A per-replica mean over samples, as the mean over all samples of the global batch.

        A pipeline's training loss is already averaged over replicas by DeepSpeed; its
        evaluation loss is per replica, the same on every stage of it. Every tensor-parallel
        shard of a replica has the same loss too, so each replica is summed `copies` times.
        """
        if dist.get_world_size() == 1 or (self.pipelined and not pipeline_output):
            return value
        copies = (self.plan.pipeline_stages if pipeline_output else 1) * self.tp.size
        tensor = torch.tensor([value * self.sample_share], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / copies

    def _maybe_fail(self) -> None:
        fault = self.fault
        if fault and fault.rank == self.rank and fault.step == self.step:
            marker = Path(fault.marker)
            if not marker.exists():
                # Wait for the commit, so the drill tests recovery from that checkpoint.
                self.session.wait_for_commit()
                marker.write_text(f"rank {self.rank} exited at step {self.step}\n")
                os._exit(1)


def where_ranks_run(plan: ParallelPlan) -> list[str]:
    """Every rank's node type, from the labels of the node Ray actually put it on."""
    if not plan.ranks:
        return []
    labels = ray.get_runtime_context().get_node_labels()
    here = plan.node_type_of(labels) if plan.select_nodes else plan.ranks[0].node_type
    everywhere: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(everywhere, here or f"a node labelled {labels}")
    return everywhere


def check_on_one_node(tp: TensorParallel) -> None:
    """A tensor-parallel group all-reduces inside every layer: its ranks must share a node's
    fast links. Ray Train numbers ranks node by node, so adjacent ranks do unless a node got a
    number of workers that tensor_parallel does not divide."""
    if not tp.active:
        return
    nodes: list[str] = [""] * tp.size
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id(), group=tp.group)
    if len(set(nodes)) > 1:
        raise PlacementError(
            f"train.tensor_parallel: the {tp.size} ranks of a tensor-parallel group landed on "
            f"{len(set(nodes))} nodes; they must share one. To fix: use node types whose GPU "
            "count tensor_parallel divides, and whole nodes of workers."
        )


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1024 + rank


def _write_metadata(
    folder: Path, job: JobSpec, plan: ParallelPlan, metrics: dict[str, Any], corpus_key: str
) -> None:
    metadata = {
        "job": job.model_dump(mode="json"),
        "plan": plan.to_dict(),
        "metrics": metrics,
        "corpus": corpus_key,  # the tokens it trained on, by content: a resume needs the same
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
