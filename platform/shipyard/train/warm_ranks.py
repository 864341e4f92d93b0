"""Warm ranks: rank processes that outlive a run, so a sweep's next trial starts in seconds.

A Ray Train run starts new processes for its controller, its helpers and its ranks, and every
rank imports torch, DeepSpeed and Ray Train and joins a new process group: on 2 cores, 20–30 s
of each sweep trial. A sweep trains many short runs of one layout, so it keeps *gangs* instead.
A gang is the ranks of one run, placed as Ray Train places them (one placement group, PACK),
joined once in a process group that lives as long as the gang. A trial borrows a gang of its
shape from the sweep's `RankPool`, trains on it (the same `Worker` loop as every run), and the
gang goes back to the pool.

What Ray Train did for a run, the pool does here:
- checkpoints: every rank stores its files under the run's folder, then all wait for each
  other; only then does rank 0 mark the checkpoint committed and report it (the commit rule);
- failures: a gang with a failed rank is ended (its other ranks may wait in a collective) and
  the run continues on a new gang from its newest committed checkpoint, up to
  `failure.max_failures` times;
- a run's owner gone: its metrics queue dies with it; rank 0 finds out when Ray tells it (it
  asks the queue's actor, one call at a time, without waiting) and every rank leaves the run
  at the same step, keeping the gang for the next trial. Tune ends a stopped or paused trial
  only when it reuses its actor for the next one, so a scheduler that stops or pauses a
  trial ends its runs at once (`end_runs`): they would train on for nothing meanwhile, and
  the next trial would wait for their gang. That goes straight to rank 0 (`WarmRank.leave`),
  not through the queue's end: Ray takes a second or two to tell a caller an actor died.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shipyard.plan.plan import ParallelPlan
from shipyard.spec.job import JobSpec
from shipyard.storage import open_store, ray_storage
from shipyard.train.entry import hidden_module

POOL_NAME = "shipyard-rank-pool"  # in the driver's namespace: one sweep at a time runs there
CONTROL = "control"  # a warm rank's concurrency group for calls made while it trains
CHECKPOINT_PREFIX = "checkpoint_"
COMMITTED = "committed"  # in a checkpoint once every rank's files are stored


@dataclass(frozen=True)
class GangShape:
    """What makes gangs interchangeable: their ranks, each rank's resources and node type."""

    num_workers: int
    cpus: float
    gpus: float
    backend: str
    node_selectors: tuple[tuple[tuple[str, str], ...], ...] = ()

    @classmethod
    def of(cls, plan: ParallelPlan) -> GangShape:
        selectors = ()
        if plan.select_nodes:
            selectors = tuple(tuple(sorted(rank.node_selector.items())) for rank in plan.ranks)
        return cls(
            plan.num_workers,
            plan.cpus_per_worker,
            plan.gpus_per_worker,
            plan.backend,
            selectors,
        )

    def bundles(self) -> list[dict[str, float]]:
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        return [dict(bundle) for _ in range(self.num_workers)]


class WarmRank:
    """One rank's process: imports the training loop once, joins its gang's process group
    once, then trains one run after another. `leave` is answered while a run trains (its own
    concurrency group, CONTROL)."""

    def __init__(self):
        # Ray may hand an actor a process it started long before: its start counts from here.
        self.born = time.time()
        with hidden_module("mlflow"):  # as in every rank (see `hidden_module`)
            import shipyard.train.worker  # noqa: F401  torch, DeepSpeed, the loop
        gc.freeze()  # see `_collect_run`
        self.runs = 0
        self.rank = 0
        self.session: WarmSession | None = None  # the run it trains now

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def address(self) -> tuple[str, int]:
        """Where the gang's process group meets: this node's address (127.0.0.1 on the
        embedded Ray) and a port free on it."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as probe:
            probe.bind((host, 0))
            return host, probe.getsockname()[1]

    def join(self, rank: int, local_rank: int, world: int, local_world: int, address, backend):
        """Join the gang's process group, as torchrun would start this rank."""
        import torch.distributed as dist

        host, port = address
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(local_rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(local_world),
            MASTER_ADDR=host,
            MASTER_PORT=str(port),
        )
        if backend == "nccl":
            import torch

            torch.cuda.set_device(0)  # Ray shows this actor its own GPUs only
        dist.init_process_group(
            backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world
        )
        self.rank = rank

    def run(self, config: dict[str, Any], queue, checkpoints: str, own_checkpoint) -> int:
        """Train one run as this rank; returns how many runs this process has trained."""
        from shipyard.train.worker import run_rank

        # The first run's start includes this process's own (its imports, the group's join).
        created = self.born if self.runs == 0 else None
        name = config["job"]["name"]
        self.session = WarmSession(self.rank, name, created, queue, checkpoints, own_checkpoint)
        try:
            run_rank(config, self.session)
        finally:
            self.session = None
            self.runs += 1
            _collect_run()
        return self.runs

    @ray.method(concurrency_group=CONTROL)
    def leave(self, name: str) -> None:
        """Make run `name`, if this rank trains it now, leave at the next step (rank 0 tells
        the others)."""
        session = self.session
        if session is not None and session.name == name:
            session.leaving = True


def _collect_run() -> None:
    """Free the run's engine (its reference cycles) before the next run builds its own.

    What survives is the process's own (modules, some imported by the first run, and caches),
    so it is frozen: the next collection looks only at what the next run made. A full one
    over torch's and DeepSpeed's objects took over a second of every trial's start."""
    gc.collect()
    gc.freeze()


class WarmSession:
    """The `RankSession` of a rank in a warm gang (see the module's text)."""

    def __init__(
        self, rank: int, name: str, created: float | None, queue, checkpoints: str, own_checkpoint
    ):
        self.rank, self.name, self.created, self.queue = rank, name, created, queue
        self.checkpoints, self.own = checkpoints, own_checkpoint
        self.leaving = False  # set by `WarmRank.leave`, from another thread
        self._device = None
        self._probe = None  # rank 0's call asking whether the run's queue is still there

    def world_rank(self) -> int:
        return self.rank

    def device(self, plan: ParallelPlan):
        import torch

        self._device = torch.device("cuda", 0) if plan.device == "cuda" else torch.device("cpu")
        return self._device

    def created_at(self) -> float | None:
        return self.created

    def own_checkpoint(self):
        return self.own

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None) -> bool:
        import torch.distributed as dist

        row = dict(metrics)
        if checkpoint_folder is not None:
            location = f"{self.checkpoints}/{CHECKPOINT_PREFIX}{metrics['step']:06d}"
            try:
                store_folder(Path(checkpoint_folder), location)
            finally:
                shutil.rmtree(checkpoint_folder, ignore_errors=True)
            dist.barrier()  # every rank's files are stored: the checkpoint is whole
            if self.rank == 0:
                open_store(location).put_text(COMMITTED, "")
            row["checkpoint"] = location
        wanted = not self.leaving
        if self.rank == 0 and wanted:
            try:
                self.queue.put(row)
            except ray.exceptions.RayActorError:  # the queue died with its run's owner
                wanted = False
        return self._agree(wanted)

    def wait_for_commit(self) -> None:
        """Nothing to wait for: `report` returns once its checkpoint is committed."""

    def keep_going(self) -> bool:
        return self._agree(not self.leaving and self._queue_alive() if self.rank == 0 else True)

    def _queue_alive(self) -> bool:
        """False once the last answered probe of the queue's actor found it gone; a step never
        waits for a probe (an answer arrives while the rank trains)."""
        if self._probe is None:
            self._probe = self.queue.actor.qsize.remote()
        ready, _ = ray.wait([self._probe], timeout=0)
        if not ready:
            return True
        probe, self._probe = self._probe, None
        try:
            ray.get(probe)
        except ray.exceptions.RayActorError:
            return False
        return True

    def _agree(self, wanted: bool) -> bool:
        """Rank 0's answer, on every rank, so they all leave the run at the same step."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(wanted)], device=self._device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())


def store_folder(folder: Path, location: str) -> None:
    """Copy every file under `folder` to the folder or S3 prefix `location`."""
    store = open_store(location)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            store.upload(path, path.relative_to(folder).as_posix())


@dataclass
class Gang:
    """The ranks of one run, joined in one process group, and the placement group they hold."""

    shape: GangShape
    group: Any
    ranks: list[Any] = field(default_factory=list)

    @classmethod
    async def start(cls, shape: GangShape) -> Gang:
        selectors = [dict(selector) for selector in shape.node_selectors] or None
        group = placement_group(shape.bundles(), strategy="PACK", bundle_label_selector=selectors)
        gang = cls(shape, group)
        try:
            await group.ready()
            actor = ray.remote(concurrency_groups={CONTROL: 1})(WarmRank)
            gang.ranks = [
                actor.options(
                    num_cpus=shape.cpus,
                    num_gpus=shape.gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, index),
                ).remote()
                for index in range(shape.num_workers)
            ]
            nodes = await asyncio.gather(*(rank.node.remote() for rank in gang.ranks))
            address = await gang.ranks[0].address.remote()
            await asyncio.gather(
                *(
                    rank.join.remote(
                        index,
                        nodes[:index].count(node),
                        shape.num_workers,
                        nodes.count(node),
                        address,
                        shape.backend,
                    )
                    for index, (rank, node) in enumerate(zip(gang.ranks, nodes, strict=True))
                )
            )
        except BaseException:
            gang.end()
            raise
        return gang

    def end(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)
        remove_placement_group(self.group)


class RankPool:
    """A sweep's gangs (a Ray actor, one per sweep): at most `max_gangs`, one per trial that
    runs at once. A trial borrows a gang of its shape, or a new one when there is room (an
    idle gang of another shape is ended to make it), else waits for one to come back."""

    def __init__(self, max_gangs: int):
        self.max_gangs = max_gangs
        self.idle: list[Gang] = []
        self.busy = 0
        self.changed = asyncio.Condition()
        self.training: dict[str, Gang] = {}  # run name -> the gang that trains it

    async def train(self, shape: GangShape, config, queue, checkpoints: str, own) -> None:
        """Train one run on a gang of `shape`; a failure ends the gang and is raised."""
        name = config["job"]["name"]
        gang = await self._borrow(shape)
        self.training[name] = gang
        try:
            await asyncio.gather(
                *(rank.run.remote(config, queue, checkpoints, own) for rank in gang.ranks)
            )
        except BaseException:
            gang.end()
            await self._give_back(None)
            raise
        finally:
            self.training.pop(name, None)
        await self._give_back(gang)

    def end_runs(self, prefix: str) -> None:
        """End the runs whose names start with `prefix`: their ranks leave within a step."""
        for name, gang in self.training.items():
            if name.startswith(prefix):
                gang.ranks[0].leave.remote(name)

    def size(self) -> int:
        return self.busy + len(self.idle)

    def shutdown(self) -> None:
        for gang in self.idle:
            gang.end()
        self.idle.clear()

    async def _borrow(self, shape: GangShape) -> Gang:
        async with self.changed:
            while True:
                gang = next((gang for gang in self.idle if gang.shape == shape), None)
                if gang is not None:
                    self.idle.remove(gang)
                    self.busy += 1
                    return gang
                if self.size() < self.max_gangs:
                    self.busy += 1
                    break
                if self.idle:  # only other shapes are idle: end one to make room
                    self.idle.pop(0).end()
                    continue
                await self.changed.wait()
        try:
            return await Gang.start(shape)
        except BaseException:
            await self._give_back(None)
            raise

    async def _give_back(self, gang: Gang | None) -> None:
        async with self.changed:
            self.busy -= 1
            if gang is not None:
                self.idle.append(gang)
            self.changed.notify_all()


def start_rank_pool(max_gangs: int):
    """The sweep's pool of warm gangs, as a Ray actor owned by this process (its gangs end
    with it), named POOL_NAME so that a scheduler can reach it (see `end_pool_runs`)."""
    return ray.remote(num_cpus=0)(RankPool).options(name=POOL_NAME).remote(max_gangs)


def stop_rank_pool(pool) -> None:
    """End the pool's gangs and the pool (a gang still training ends with its owner), and
    wait until its name is free for the next sweep's."""
    with suppress(ray.exceptions.RayError):
        ray.get(pool.shutdown.remote(), timeout=30)
    ray.kill(pool)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor(POOL_NAME)
        except ValueError:
            return
        time.sleep(0.05)


def end_pool_runs(prefix: str) -> None:
    """Ask the running sweep's pool, if there is one, to end the runs whose names start with
    `prefix` (it does not wait for them to end)."""
    with suppress(ValueError):
        ray.get_actor(POOL_NAME).end_runs.remote(prefix)


@dataclass
class WarmResult:
    """What `run_training` reads of a finished run, as of Ray Train's `Result`."""

    checkpoint: Any  # the last reported ray.train.Checkpoint, or None


class WarmRun:
    """Stands in for Ray Train's TorchTrainer in `run_training`: `fit()` trains the run on a
    gang of the pool, continuing on a new gang from its newest committed checkpoint after a
    failure (`failure.max_failures` times)."""

    def __init__(self, pool, job: JobSpec, plan: ParallelPlan, config: dict, queue):
        self.pool, self.job, self.plan = pool, job, plan
        self.config, self.queue = config, queue
        self.location = f"{job.storage.rstrip('/')}/{job.name}"  # its checkpoints' folder

    def fit(self) -> WarmResult:
        shape = GangShape.of(self.plan)
        failures, own = 0, None
        while True:
            train = self.pool.train.remote(shape, self.config, self.queue, self.location, own)
            try:
                ray.get(train)
                return WarmResult(checkpoint_at(newest_committed(self.location)))
            except ray.exceptions.RayError:
                failures += 1
                if failures > self.job.failure.max_failures:
                    raise
                own = checkpoint_at(newest_committed(self.location))


def newest_committed(location: str) -> str | None:
    """The run's newest committed checkpoint under `location`, or None."""
    steps = [
        key.split("/")[0]
        for key in open_store(location).keys("")
        if key.startswith(CHECKPOINT_PREFIX) and key.endswith(f"/{COMMITTED}")
    ]
    return f"{location}/{max(steps)}" if steps else None


def checkpoint_at(location: str | None):
    """The ray.train.Checkpoint at a folder or S3 location Shipyard names, or None."""
    if location is None:
        return None
    path, filesystem = ray_storage(location)
    return ray.train.Checkpoint(path, filesystem=filesystem)
