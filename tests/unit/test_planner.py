"""The planner: the ZeRO paper's memory figures, speed-weighted splits, and whole plans."""

from __future__ import annotations

import json

import pytest
import yaml

from shipyard import SpecError, hardware
from shipyard.cli import main
from shipyard.errors import ResourceError
from shipyard.models import model_family
from shipyard.models.gpt import GPT
from shipyard.plan.memory import model_state_bytes, rank_memory
from shipyard.plan.partition import split_by_speed
from shipyard.plan.plan import ParallelPlan, make_plan
from shipyard.spec.cluster import local_cluster, parse_cluster
from shipyard.spec.job import GptModelSpec, JobSpec
from shipyard.spec.load import load_cluster, load_job
from tests.conftest import REPO

GB = 1e9


def model_size(spec):
    return model_family(spec).size()


@pytest.mark.parametrize(("stage", "expected_gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_model_states_match_the_zero_paper(stage, expected_gb):
    # ZeRO (Rajbhandari et al. 2020), Figure 1: a 7.5B model on 64 GPUs, mixed-precision Adam.
    states = model_state_bytes(7.5e9, "fp16", stage, data_parallel_size=64)
    assert states.device / GB == pytest.approx(expected_gb, abs=0.05)  # the paper rounds


def test_offload_moves_optimizer_then_parameters_to_the_host():
    optimizer = model_state_bytes(1e9, "bf16", 3, 8, offload_optimizer=True)
    both = model_state_bytes(1e9, "bf16", 3, 8, offload_optimizer=True, offload_parameters=True)
    assert optimizer.optimizer == 0 and optimizer.host == pytest.approx(12e9 / 8)
    assert both.parameters == 0 and both.host == pytest.approx(14e9 / 8)


@pytest.mark.parametrize(
    "spec",
    [
        GptModelSpec(layers=2, heads=2, width=32, sequence_length=16),
        GptModelSpec(vocabulary_size=1000),
    ],
)
def test_parameter_count_is_the_built_models(spec):
    built = sum(parameter.numel() for parameter in GPT(spec, seed=0).parameters())
    assert model_size(spec).total == built


def test_recomputation_and_pipeline_depth_change_activation_memory():
    size = model_size(GptModelSpec(layers=8, width=1024, heads=16, sequence_length=1024))
    common = dict(
        layers=4,
        has_embedding=False,
        has_head=False,
        micro_batch_size=4,
        precision="bf16",
        zero_stage=1,
        data_parallel_size=1,
        offload_optimizer=False,
        offload_parameters=False,
    )
    kept = rank_memory(size, in_flight=1, checkpointing=False, **common).activations
    recomputed = rank_memory(size, in_flight=1, checkpointing=True, **common).activations
    first_of_four = rank_memory(size, in_flight=4, checkpointing=False, **common).activations
    assert kept == pytest.approx(34 * 1024 * 1024 * 4 * 4)  # 34·s·b·h per layer, 4 layers
    assert recomputed == pytest.approx(kept * 2 / 34)
    assert first_of_four == pytest.approx(4 * kept)


def test_split_by_speed_gives_a_twice_as_fast_worker_twice_the_work():
    assert split_by_speed(12, [2.0, 1.0]) == (8, 4)
    assert split_by_speed(12, [2.0, 1.0], caps=[6, None]) == (6, 6)
    assert split_by_speed(12, [2.0, 1.0], caps=[6, 5]) is None
    assert split_by_speed(12, [1.0, 1.0], fixed=[0.0, 2.0]) == (7, 5)
    assert split_by_speed(1, [1.0, 1.0]) is None  # everyone needs at least one


def two_gpu_cluster(fast="V100-32G", slow="T4"):
    """One node with a V100 and one with a T4: in fp32 the V100 is 1.94× as fast."""
    node = lambda model: {  # noqa: E731
        "resources": {"CPU": 8, "GPU": 1, f"accelerator_type:{model}": 1},
        "node_config": {},
        "min_workers": 1,
        "max_workers": 1,
    }
    return parse_cluster(
        {
            "cluster_name": "pair",
            "provider": {"type": "aws", "region": "us-east-1"},
            "head_node_type": "head",
            "available_node_types": {
                "head": {"resources": {"CPU": 4}, "node_config": {}},
                "fast": node(fast),
                "slow": node(slow),
            },
        },
        "<pair>",
    )


def gpu_job(**train) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "t",
            "model": {"layers": 12, "heads": 4, "width": 256, "sequence_length": 128},
            "train": {"num_workers": 2, "gpus_per_worker": 1, "micro_batch_size": 8, **train},
        }
    )


def test_a_twice_as_fast_replica_takes_about_twice_the_samples():
    plan = make_plan(gpu_job(), two_gpu_cluster())
    assert plan.global_batch_size == 16, "the global batch is the job's"
    fast, slow = plan.replica_micro_batches
    assert (fast, slow) == (11, 5)
    assert [rank.device for rank in plan.ranks] == ["V100-32G", "T4"]
    assert plan.device == "cuda" and plan.backend == "nccl"


def test_a_twice_as_fast_stage_takes_about_twice_the_layers():
    plan = make_plan(gpu_job(pipeline_stages=2), two_gpu_cluster())
    fast, slow = plan.layers_per_stage
    assert fast + slow == 12 and 1.5 <= fast / slow <= 2.5
    assert [rank.node_type for rank in plan.ranks] == ["fast", "slow"]


def test_memory_bounds_the_split():
    # A model whose state is near a T4's 16 GB: the planner keeps its stage small.
    job = gpu_job(pipeline_stages=2, zero_stage=0, micro_batch_size=1, precision="fp16")
    big = job.model_copy(
        update={"model": GptModelSpec(layers=24, heads=16, width=2048, sequence_length=512)}
    )
    plan = make_plan(big, two_gpu_cluster(fast="A100-80G"))
    for rank in plan.ranks:
        assert rank.memory_gib <= rank.capacity_gib
    assert plan.layers_per_stage[1] < plan.layers_per_stage[0]


def test_nothing_fits_says_what_would():
    job = gpu_job(zero_stage=0, micro_batch_size=1, precision="fp16")
    huge = job.model_copy(
        update={"model": GptModelSpec(layers=40, heads=40, width=5120, sequence_length=2048)}
    )
    with pytest.raises(ResourceError) as caught:
        make_plan(huge, two_gpu_cluster())
    message = str(caught.value)
    assert "<pair>: no layout of job 't' fits" in message and "To fix:" in message
    assert "add nodes" in message


def test_too_few_devices_for_a_manual_layout():
    with pytest.raises(ResourceError, match=r"train\.num_workers: 4 workers, but the cluster"):
        make_plan(gpu_job(num_workers=4), two_gpu_cluster())


def test_auto_is_never_slower_than_the_jobs_own_layout():
    cluster = load_cluster(REPO / "cluster" / "aws_hetero.yaml")
    job = load_job(REPO / "jobs" / "gpt-1b-hetero.yaml")
    manual = job.model_copy(
        update={
            "train": job.train.model_copy(
                update={
                    "parallelism": "manual",
                    "num_workers": 16,
                    "pipeline_stages": 2,
                    "micro_batch_size": 1,
                    "gradient_accumulation": 32,
                }
            )
        }
    )
    auto_plan, manual_plan = make_plan(job, cluster), make_plan(manual, cluster)
    assert auto_plan.global_batch_size == manual_plan.global_batch_size == 256
    assert auto_plan.estimate.step_seconds <= manual_plan.estimate.step_seconds
    assert all(rank.memory_gib <= rank.capacity_gib for rank in auto_plan.ranks)
    assert auto_plan.ranks[0].device == "A100-80G", "the fastest devices come first"


def test_on_this_machine_a_manual_plan_is_the_job_as_written():
    job = load_job(REPO / "jobs" / "tiny-gpt.yaml")
    placed, written = make_plan(job, local_cluster()), make_plan(job)
    for name in (
        "num_workers",
        "data_parallel_size",
        "zero_stage",
        "micro_batch_size",
        "gradient_accumulation",
        "layers_per_stage",
        "device",
    ):
        assert getattr(placed, name) == getattr(written, name), name
    assert placed.estimate.tokens_per_second > 0


SHIPPED = {
    "local.yaml": [
        "tiny-gpt.yaml",
        "pipeline-gpt.yaml",
        "3d-gpt.yaml",
        "zero3-offload-bf16.yaml",
        "sweep-tiny-gpt.yaml",
        "tiny-llama.yaml",
        "gpt2-pipeline.yaml",
        "finetune-tiny-llama.yaml",
    ],
    "fake_hetero.yaml": [
        "tiny-gpt.yaml",
        "pipeline-gpt.yaml",
        "tiny-llama.yaml",
        "gpt2-pipeline.yaml",
    ],
    "aws_hetero.yaml": ["gpt-1b-hetero.yaml"],
}


@pytest.mark.parametrize(
    ("cluster_file", "job_file"),
    [(cluster, job) for cluster, jobs in SHIPPED.items() for job in jobs],
)
def test_every_shipped_cluster_and_job_plans(cluster_file, job_file, shipped_pretrained):
    plan = make_plan(
        load_job(REPO / "jobs" / job_file), load_cluster(REPO / "cluster" / cluster_file)
    )
    assert plan.ranks and plan.estimate.step_seconds > 0
    assert ParallelPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_every_shipped_file_is_in_the_table():
    assert {p.name for p in (REPO / "cluster").glob("*.yaml")} == set(SHIPPED)
    assert {p.name for p in (REPO / "jobs").glob("*.yaml")} == {
        job for jobs in SHIPPED.values() for job in jobs
    }


def test_explain_lists_candidates_and_reasons(capsys):
    code = main(
        [
            "plan",
            str(REPO / "jobs" / "gpt-1b-hetero.yaml"),
            "--cluster",
            str(REPO / "cluster" / "aws_hetero.yaml"),
            "--explain",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "layouts considered" in out and "— chosen" in out and "did not fit" in out
    assert "per 1M tokens" in out and "a100_80gb (A100-80G)" in out


def test_plan_json_is_plain_data(capsys):
    code = main(["plan", str(REPO / "jobs" / "tiny-gpt.yaml"), "--json", "--explain"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and document["num_workers"] == 2
    assert document["ranks"][0]["node_type"] == "ray.head.default"
    assert document["candidates"][0]["rejected"] is None


def test_a_bad_cluster_file_is_a_clean_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"cluster_name": "x"}))
    code = main(["plan", str(REPO / "jobs" / "tiny-gpt.yaml"), "--cluster", str(path)])
    assert code == 2
    assert f"{path}: the top level: 'provider' is a required property" in capsys.readouterr().err


def test_spec_error_type_for_missing_cluster_file():
    with pytest.raises(SpecError, match=r"no such file\. To fix: give the path of a cluster YAML"):
        load_cluster("cluster/none.yaml")


def test_ranks_are_pinned_to_their_node_types_only_on_mixed_clusters():
    from shipyard.train.deepspeed_config import deepspeed_config
    from shipyard.train.trainer import placement

    job = load_job(REPO / "jobs" / "tiny-gpt.yaml")
    fake = make_plan(job, load_cluster(REPO / "cluster" / "fake_hetero.yaml"))
    assert placement(fake) == [
        {"shipyard-device": "a100"},
        {"shipyard-device": "t4"},
    ]
    assert placement(make_plan(job, local_cluster())) is None
    assert placement(make_plan(job)) is None
    # Each rank's DeepSpeed batch numbers multiply up with its own share of the samples.
    fast, slow = fake.replica_micro_batches
    assert fast > slow and fast + slow == 16
    config = deepspeed_config(fake, job.train, micro_batch_size=slow)
    assert config["train_micro_batch_size_per_gpu"] == slow
    assert config["train_batch_size"] == slow * fake.gradient_accumulation * 2


def test_a_measured_curve_replaces_the_catalogs(tmp_path, monkeypatch):
    from shipyard.plan.devices import cpu_threads
    from shipyard.plan.profile import block_seconds, fit_profile, load_profiles, save_profile

    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path))
    job = JobSpec.model_validate(
        {"name": "small", "model": {"layers": 2, "heads": 2, "width": 64, "sequence_length": 32}}
    )
    catalog = make_plan(job, local_cluster()).estimate
    threads = cpu_threads(job.train.cpus_per_worker)
    cpu = hardware.cpu_device(threads, 1.0)
    profile = fit_profile(job, cpu, threads, block_seconds(job, "cpu", threads))
    assert 0 < profile.efficiency <= 1.5 and profile.half_efficiency_tokens >= 0
    times = list(profile.seconds_by_micro_batch.values())
    assert times[-1] > times[0], "16 sequences take longer than 1"
    save_profile(profile)
    measured = make_plan(job, local_cluster(), load_profiles(job)).estimate
    assert measured.step_seconds != catalog.step_seconds
    assert measured.seconds_by_cause["DeepSpeed engine (measured)"] == 0, "not measured here"


def _node(labels: dict[str, str], cpus: float = 8, gpus: float = 0, alive: bool = True) -> dict:
    """A row of Ray's node table (ray.nodes())."""
    return {"Alive": alive, "Labels": labels, "Resources": {"CPU": cpus, "GPU": gpus}}


def test_profiling_targets_the_node_types_that_are_up_by_their_labels():
    from shipyard.train.profiler import profile_targets

    job = load_job(REPO / "jobs/gpt-1b-hetero.yaml")
    aws = load_cluster(REPO / "cluster/aws_hetero.yaml")
    targets, skipped = profile_targets(job, aws, [])
    assert targets == [] and len(skipped) == 3
    assert all("no node of it is up" in line and "--address" in line for line in skipped)

    a100 = {"ray.io/node-group": "a100_80gb"}
    t4 = {"ray.io/node-group": "t4"}
    nodes = [_node(a100, 96, 8), _node(t4, 4, 1), _node(t4, 4, 1, alive=False)]
    targets, skipped = profile_targets(job, aws, nodes)
    assert [(t.group.node_type, t.node_selector, t.ranks) for t in targets] == [
        ("a100_80gb", a100, 2),
        ("t4", t4, 1),  # one live T4: a single rank
    ]
    assert [line.split(":")[0] for line in skipped] == ["v100_32gb"]


def test_profiling_skips_fake_gpus_and_profiles_this_machine_without_labels():
    from shipyard.train.profiler import profile_targets

    job = load_job(REPO / "jobs/tiny-gpt.yaml")
    fake = load_cluster(REPO / "cluster/fake_hetero.yaml")
    targets, skipped = profile_targets(job, fake, [_node({"shipyard-device": "a100"})])
    assert targets == [] and all("fake node" in line for line in skipped)

    (target,), skipped = profile_targets(job, local_cluster(), [_node({}, cpus=2)])
    assert target.node_selector is None and target.ranks == 2 and not skipped
    assert not target.group.device.is_gpu


def test_measured_speeds_are_interpolated_not_forced_onto_a_curve():
    import dataclasses

    cpu = hardware.cpu_device(1, 1.0)
    # A CPU whose cache makes 256-token micro-batches slower per token than 128-token ones.
    measured = dataclasses.replace(
        cpu,
        measured_flops={"fp32": ((128, 2e9), (256, 1e9), (512, 3e9))},
        half_efficiency_tokens=128,
    )
    assert measured.achieved_flops("fp32", 192) == pytest.approx(1.5e9)
    assert measured.achieved_flops("fp32", 256) == pytest.approx(1e9)
    assert measured.achieved_flops("fp32", 4096) == measured.achieved_flops("fp32", 0) == 3e9
    # Below the smallest measured size the curve's shape carries on: 64/(64+128) ÷ 128/256.
    assert measured.achieved_flops("fp32", 64) == pytest.approx(2e9 * (1 / 3) / 0.5)
    curve = dataclasses.replace(measured, measured_flops={})
    assert measured.achieved_flops("bf16", 128) == curve.achieved_flops("bf16", 128), "fp32 only"


def test_ranks_take_the_roles_of_the_node_types_ray_put_them_on():
    from shipyard.errors import PlacementError

    job = load_job(REPO / "jobs" / "tiny-gpt.yaml")
    fake = make_plan(job, load_cluster(REPO / "cluster" / "fake_hetero.yaml"))
    assert fake.node_type_of({"shipyard-device": "t4", "other": "x"}) == "t4_node"
    assert fake.node_type_of({"shipyard-device": "h100"}) is None
    a100_rank, t4_rank = fake.ranks
    assert fake.roles(["a100_node", "t4_node"]) == (a100_rank, t4_rank)
    # Ray numbered the T4 worker first: it still takes the T4's smaller share of the samples.
    assert fake.roles(["t4_node", "a100_node"]) == (t4_rank, a100_rank)
    with pytest.raises(PlacementError, match=r"placed the ranks on \['t4_node', 't4_node'\]"):
        fake.roles(["t4_node", "t4_node"])
    # A pipeline's stage comes with the rank number: a swapped pipeline cannot be played.
    piped = job.model_copy(update={"train": job.train.model_copy(update={"pipeline_stages": 2})})
    pipeline = make_plan(piped, load_cluster(REPO / "cluster" / "fake_hetero.yaml"))
    assert pipeline.roles(["a100_node", "t4_node"]) == pipeline.ranks
    with pytest.raises(PlacementError, match="rank 0 \\(pipeline stage 0\\) on t4_node"):
        pipeline.roles(["t4_node", "a100_node"])


def gpu_box(nodes: int = 1, gpus: int = 4, model: str = "A100-80G"):
    """`nodes` nodes of `gpus` like GPUs each."""
    gpu_node = {
        "resources": {"CPU": 32, "GPU": gpus, f"accelerator_type:{model}": gpus},
        "node_config": {},
        "min_workers": nodes,
        "max_workers": nodes,
    }
    return parse_cluster(
        {
            "cluster_name": "box",
            "provider": {"type": "aws", "region": "us-east-1"},
            "head_node_type": "head",
            "available_node_types": {
                "head": {"resources": {"CPU": 4}, "node_config": {}},
                "gpu": gpu_node,
            },
        },
        "<box>",
    )


def wide_job(**train) -> JobSpec:
    """Two blocks of 3.2 B parameters each: beyond one A100's memory unless split."""
    return JobSpec.model_validate(
        {
            "name": "wide",
            "model": {"layers": 2, "heads": 64, "width": 16384, "sequence_length": 1024},
            "train": {
                "gpus_per_worker": 1,
                "micro_batch_size": 1,
                "precision": "bf16",
                "zero_stage": 0,
                **train,
            },
        }
    )


def test_a_tensor_parallel_shard_holds_what_the_split_layers_hold():
    from shipyard.models.gpt import Block, Embedding, Head
    from shipyard.models.tensor_parallel import TensorParallel

    spec = GptModelSpec(layers=2, heads=4, width=32, sequence_length=16)
    shard = model_size(spec).shard(4)
    counts = {
        cls: sum(p.numel() for p in cls(spec, 0, TensorParallel(size=4)).parameters())
        for cls in (Embedding, Block, Head)
    }
    assert (shard.embedding, shard.block, shard.head) == (
        counts[Embedding],
        counts[Block],
        counts[Head],
    )


def test_tensor_parallel_splits_a_layer_too_big_for_one_gpu():
    with pytest.raises(ResourceError, match="does not fit"):
        make_plan(wide_job(num_workers=1), gpu_box())
    plan = make_plan(wide_job(num_workers=4, tensor_parallel=4), gpu_box())
    assert plan.tensor_parallel == 4 and plan.data_parallel_size == 1
    assert [(rank.rank, rank.shard) for rank in plan.ranks] == [(r, r) for r in range(4)]
    assert all(rank.memory_gib <= rank.capacity_gib for rank in plan.ranks)
    assert plan.estimate.seconds_by_cause["tensor-parallel all-reduce"] > 0
    assert "data parallel 1 × pipeline 1 × tensor parallel 4" in plan.explain()


def test_tensor_parallel_halves_what_a_rank_holds():
    job = wide_job(num_workers=1).model_copy(
        update={"model": GptModelSpec(layers=2, heads=16, width=4096, sequence_length=1024)}
    )
    split = job.model_copy(
        update={"train": job.train.model_copy(update={"num_workers": 2, "tensor_parallel": 2})}
    )
    one, two = make_plan(job, gpu_box()), make_plan(split, gpu_box())
    ratio = two.ranks[0].memory_gib / one.ranks[0].memory_gib
    assert 0.5 <= ratio < 0.56, ratio  # only norms, positions and biases stay whole


def test_auto_planning_searches_tensor_parallel_within_a_node():
    plan = make_plan(wide_job(parallelism="auto", global_batch_size=8), gpu_box(nodes=2))
    assert plan.tensor_parallel > 1
    assert all(rank.memory_gib <= rank.capacity_gib for rank in plan.ranks)
    assert plan.tensor_parallel <= 4, "a tensor-parallel group never spans nodes"


def test_tensor_parallel_wider_than_a_node_is_refused():
    with pytest.raises(ResourceError) as caught:
        make_plan(wide_job(num_workers=8, tensor_parallel=8), gpu_box(nodes=2))
    assert "tensor parallel 8 needs 8 devices of one node per slot; gpu has 4 per node" in str(
        caught.value
    )
