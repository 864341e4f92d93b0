"""Hugging Face models and your own modules on real Ray Train + DeepSpeed: every layout trains
the same model, a stopped run resumes exactly, a fine-tune starts from its folder's weights, and
every checkpoint exports to a folder transformers opens and evaluates as training did.

The Llama and GPT-2 runs train the shipped jobs' models (jobs/tiny-llama.yaml,
jobs/gpt2-pipeline.yaml) for 24 steps. Layouts are compared on the same global batch: data
parallel 2 × micro-batch 4 reads the very windows a single replica of micro-batch 8 does.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from shipyard.artifacts import export_to
from shipyard.data.batches import TokenStream, training_batches
from shipyard.data.corpus import local_corpus, prepare_corpus
from shipyard.models.loss import language_model_loss
from shipyard.serve.export import export_checkpoint, load_exported_model
from shipyard.spec.load import load_job
from shipyard.train.checkpoint import latest_checkpoint, saved_checkpoints
from shipyard.train.trainer import run_training
from tests.conftest import REPO
from tests.integration.conftest import shipped_job, tiny_job, validation_loss

pytestmark = pytest.mark.integration

UNIFORM_LOSS = math.log(256)
FAMILIES = {"llama": "tiny-llama.yaml", "gpt2": "gpt2-pipeline.yaml"}
ONE_REPLICA = {"micro_batch_size": 8}  # the global micro-batch of 2 replicas × 4
LAYOUTS = {
    "zero0": {"zero_stage": 0, "pipeline_stages": 1},
    "zero1": {"zero_stage": 1, "pipeline_stages": 1},
    "zero3": {
        "zero_stage": 3,
        "pipeline_stages": 1,
        "offload_optimizer": True,
        "offload_parameters": True,
    },
    "pp2": {"zero_stage": 1, "pipeline_stages": 2, **ONE_REPLICA},
    "tp2": {"zero_stage": 1, "pipeline_stages": 1, "tensor_parallel": 2, **ONE_REPLICA},
}
BF16 = {"llama": {"precision": "bf16"}, "gpt2": {}}  # the Llama's ZeRO-1 runs in bf16


def run(model_runs, family: str, layout: str):
    train = {**LAYOUTS[layout], **(BF16[family] if layout == "zero1" else {})}
    return model_runs(FAMILIES[family], f"{family}-{layout}", **train)


def losses(result) -> list[float]:
    return [row["loss"] for row in result.history if "loss" in row]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_loss_falls_on_zero1(model_runs, family):
    result = run(model_runs, family, "zero1")
    history = losses(result)
    assert result.final["step"] == 24
    assert history[-1] < history[0] - 0.8, history
    assert result.final["val_loss"] < UNIFORM_LOSS - 1.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero3_with_offload_equals_zero0(model_runs, family):
    zero0, zero3 = run(model_runs, family, "zero0"), run(model_runs, family, "zero3")
    assert losses(zero3) == pytest.approx(losses(zero0), rel=1e-3)
    assert zero3.final["val_loss"] == pytest.approx(zero0.final["val_loss"], rel=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_pipeline_stages_train_the_one_stage_model(model_runs, family):
    """Two stages (embeddings and blocks | blocks, norm and head; GPT-2's tied embedding shared
    between them), with activation checkpointing in the GPT-2 job, against one stage."""
    zero0, pipeline = run(model_runs, family, "zero0"), run(model_runs, family, "pp2")
    assert losses(pipeline) == pytest.approx(losses(zero0), rel=1e-3)
    assert pipeline.final["val_loss"] == pytest.approx(zero0.final["val_loss"], rel=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_tensor_parallel_shards_train_the_unsplit_model(model_runs, family):
    """The shards' row-parallel products are summed in another order than one device sums
    them (~1e-7 relative per step), and 24 steps at lr 3e-3 with loss spikes amplify that to
    ~2e-3 by the end; a wrong shard or a missed all-reduce is off by far more from step 1."""
    zero0, split = run(model_runs, family, "zero0"), run(model_runs, family, "tp2")
    assert losses(split)[0] == pytest.approx(losses(zero0)[0], rel=1e-5)
    assert losses(split) == pytest.approx(losses(zero0), rel=5e-3)
    assert split.final["val_loss"] == pytest.approx(zero0.final["val_loss"], rel=5e-3)


@pytest.mark.parametrize(
    ("family", "layout"), [(f, la) for f in FAMILIES for la in ("zero3", "pp2", "tp2")]
)
def test_every_layout_exports_a_folder_transformers_evaluates_as_training_did(
    model_runs, runs_dir, family, layout
):
    result = run(model_runs, family, layout)
    name = f"{family}-{layout}"
    export = export_checkpoint(latest_checkpoint(str(runs_dir), name))
    opened = AutoModelForCausalLM.from_pretrained(export.folder, local_files_only=True).eval()
    job = shipped_job(FAMILIES[family], name, runs_dir, **LAYOUTS[layout])
    assert validation_loss(opened, job) == pytest.approx(result.final["val_loss"], rel=1e-5)


def test_a_llama_stopped_halfway_resumes_from_s3_to_the_same_losses(
    model_runs, s3, tmp_path, monkeypatch
):
    """bf16 ZeRO-1 with its checkpoints on S3: the second run starts on a machine with nothing
    of the first and continues as if it never stopped."""
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path / "first-machine"))
    uninterrupted = run(model_runs, "llama", "zero1")
    job = shipped_job(FAMILIES["llama"], "llama-resumed", f"{s3}/runs", **BF16["llama"])
    first = run_training(job, stop_at_step=12)
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path / "second-machine"))
    second = run_training(job)
    assert second.history[0]["resumed_from_step"] == 12
    assert losses(first) + losses(second) == pytest.approx(losses(uninterrupted), rel=1e-5)
    assert second.final["val_loss"] == pytest.approx(uninterrupted.final["val_loss"], rel=1e-5)


def test_a_gpt2_pipeline_stopped_halfway_resumes_to_the_same_losses(model_runs, runs_dir):
    """The shipped GPT-2 job's own layout: two stages, a tied embedding, recomputation."""
    uninterrupted = run(model_runs, "gpt2", "pp2")
    job = shipped_job(FAMILIES["gpt2"], "gpt2-resumed", runs_dir, **LAYOUTS["pp2"])
    first = run_training(job, stop_at_step=12)
    second = run_training(job)
    assert [c.step for c in saved_checkpoints(str(runs_dir), job.name)] == [12, 24]
    assert losses(first) + losses(second) == pytest.approx(losses(uninterrupted), rel=1e-5)


def test_a_fine_tune_starts_from_the_exported_weights(model_runs, runs_dir, tmp_path, monkeypatch):
    """`shipyard export` the trained tiny Llama into models/tiny-llama, then train the shipped
    fine-tune job from that folder: its first step's loss is the loss transformers computes
    from the same folder on the same batch."""
    run(model_runs, "llama", "zero0")
    saved = latest_checkpoint(str(runs_dir), "llama-zero0")
    job = load_job(REPO / "jobs" / "tiny-llama.yaml").model_copy(
        update={"name": "llama-zero0", "storage": str(runs_dir)}
    )
    folder = export_to(job, tmp_path / "models" / "tiny-llama", saved.path)
    monkeypatch.chdir(tmp_path)
    shipped = load_job(REPO / "jobs" / "finetune-tiny-llama.yaml")
    assert shipped.model.path == str(folder)
    train = {**tiny_job("x", runs_dir).train.model_dump(), "max_steps": 4, "log_every": 1}
    train |= {"eval_every": 4, "checkpoint_every": 4, "zero_stage": shipped.train.zero_stage}
    fine_tune = shipped.model_copy(
        update={
            "storage": str(tmp_path / "runs"),
            "data": tiny_job("x", runs_dir).data,
            "train": shipped.train.model_validate(train),
        }
    )
    result = run_training(fine_tune)

    corpus = prepare_corpus(fine_tune)
    length = fine_tune.model.sequence_length
    windows = TokenStream(local_corpus(corpus) / "train.bin", corpus.dtype, length)
    micro = 2 * fine_tune.train.micro_batch_size  # both replicas' shares of a micro-step
    batches = training_batches(windows, micro, fine_tune.train.seed)
    first_step = torch.cat([next(batches) for _ in range(fine_tune.train.gradient_accumulation)])
    opened = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        expected = language_model_loss(opened(first_step[:, :-1]).logits, first_step[:, 1:])
    assert result.history[0]["step"] == 1
    assert result.history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result.history[0]["loss"] < UNIFORM_LOSS - 1.0, "it starts from trained weights"


def test_a_factory_module_trains_and_resumes_in_two_pipeline_stages(mixer_run, runs_dir):
    """tests/factories.py:mixer, an nn.Sequential: stopped at step 12 and resumed, it ends with
    the losses of the uninterrupted run; its export loads back through the factory."""
    uninterrupted, job_for = mixer_run
    assert losses(uninterrupted)[-1] < losses(uninterrupted)[0] - 0.5
    resumed = job_for("mixer-resumed")
    first, second = run_training(resumed, stop_at_step=12), run_training(resumed)
    assert losses(first) + losses(second) == pytest.approx(losses(uninterrupted), rel=1e-5)
    exported = load_exported_model(
        export_checkpoint(latest_checkpoint(str(runs_dir), resumed.name))
    )
    loss = validation_loss(exported, resumed)
    assert loss == pytest.approx(second.final["val_loss"], rel=1e-5)
