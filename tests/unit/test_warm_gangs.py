"""Which runs can share a warm gang, and which checkpoint a failed run continues from."""

from __future__ import annotations

from shipyard.plan.plan import make_plan
from shipyard.spec.job import JobSpec
from shipyard.storage import open_store
from shipyard.train.warm_ranks import COMMITTED, GangShape, newest_committed
from tests.unit.test_planner import gpu_job, two_gpu_cluster


def cpu_job(**changes) -> JobSpec:
    train = {"num_workers": 2, "cpus_per_worker": 0.5, **changes.pop("train", {})}
    return JobSpec.model_validate({"name": "t", "train": train, **changes})


def test_runs_differing_in_hyperparameters_or_width_share_gangs_and_others_do_not():
    shape = GangShape.of(make_plan(cpu_job()))
    assert shape == GangShape.of(make_plan(cpu_job(train={"lr": 1e-4, "zero_stage": 2})))
    assert shape == GangShape.of(make_plan(cpu_job(model={"width": 128})))
    assert shape != GangShape.of(make_plan(cpu_job(train={"num_workers": 1})))
    assert shape != GangShape.of(make_plan(cpu_job(train={"cpus_per_worker": 1})))
    assert shape.bundles() == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert shape.backend == "gloo" and shape.node_selectors == ()


def test_a_gang_on_two_node_types_places_each_rank_as_the_plan_does():
    plan = make_plan(gpu_job(), two_gpu_cluster())
    shape = GangShape.of(plan)
    assert shape.backend == "nccl"
    assert [bundle["GPU"] for bundle in shape.bundles()] == [1, 1]
    assert [dict(selector) for selector in shape.node_selectors] == [
        dict(rank.node_selector) for rank in plan.ranks
    ]
    assert len(set(shape.node_selectors)) == 2  # one rank on each node type


def test_a_failed_run_continues_from_its_newest_whole_checkpoint(tmp_path):
    """Step 8's files were being stored when a rank died: it was never committed."""
    run = str(tmp_path / "trial-run")
    store = open_store(run)
    assert newest_committed(run) is None
    for step, committed in ((4, True), (12, True), (16, False)):
        store.put_text(f"checkpoint_{step:06d}/shipyard.json", "{}")
        if committed:
            store.put_text(f"checkpoint_{step:06d}/{COMMITTED}", "")
    assert newest_committed(run) == f"{run}/checkpoint_000012"
