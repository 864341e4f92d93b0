"""Model families without Ray: Hugging Face pieces compute what transformers computes, every
layout builds the same weights, tensor-parallel shards are the whole model cut in two, sizes
are exact, and every bad model spec is a clear error before anything starts."""

from __future__ import annotations

import json
import pickle
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from shipyard import SpecError, load_job
from shipyard.cli import main
from shipyard.models import model_family
from shipyard.models.loss import language_model_loss
from shipyard.models.tensor_parallel import SINGLE, TensorParallel, join_shards
from shipyard.runtime.local import free_port
from shipyard.spec.job import JobSpec
from tests.conftest import REPO

LLAMA = {
    "type": "huggingface",
    "architecture": "llama",
    "sequence_length": 16,
    "config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 64,
    },
}
GPT2 = {
    "type": "huggingface",
    "architecture": "gpt2",
    "sequence_length": 16,
    "config": {
        "n_embd": 32,
        "n_layer": 3,
        "n_head": 4,
        "vocab_size": 256,
        "n_positions": 32,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },
}
GPT2_UNTIED = {**GPT2, "config": {**GPT2["config"], "tie_word_embeddings": False}}
MODELS = {"llama": LLAMA, "gpt2": GPT2, "gpt2-untied": GPT2_UNTIED}
TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def family_of(model: dict, **train):
    job = JobSpec.model_validate({"name": "m", "model": model, "train": train})
    family = model_family(job.model)
    family.check(job.train)
    return family


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_pieces_compute_what_transformers_computes(name, tmp_path):
    family = family_of(MODELS[name])
    model = family.build(seed=3).eval()
    family.export(model.state_dict(), tmp_path)
    opened = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), opened(TOKENS).logits, atol=1e-5, rtol=1e-5)
    assert family.size().total == sum(p.numel() for p in opened.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_piece_draws_the_same_weights_however_the_model_is_built(name):
    """Pipeline stages build their pieces alone; the weights must be the whole model's."""
    family = family_of(MODELS[name])
    whole = family.build(seed=3)
    torch.manual_seed(999)  # the global generator must not matter
    pipeline = family.pipeline(seed=3)
    assert len(pipeline.layers) == len(whole.layers)
    for index, spec in enumerate(pipeline.layers):
        alone = spec.build()
        if getattr(spec, "forward_fn", None):  # the tied head: the embedding itself
            continue
        expected = whole.layers[index].state_dict()
        for key, value in alone.state_dict().items():
            assert torch.equal(value, expected[key]), f"piece {index} {key}"
    other = family.build(seed=4).state_dict()
    assert any(not torch.equal(other[key], value) for key, value in whole.state_dict().items())


def test_a_pretrained_folder_loads_as_transformers_saved_it(tmp_path):
    config = model_family(JobSpec.model_validate({"name": "m", "model": LLAMA}).model).config
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(config).eval()
    saved.save_pretrained(tmp_path / "pretrained", max_shard_size="20KB")
    assert (tmp_path / "pretrained" / "model.safetensors.index.json").is_file(), "sharded"
    family = family_of(
        {"type": "huggingface", "path": str(tmp_path / "pretrained"), "sequence_length": 16}
    )
    for model in (family.build(seed=0).eval(), _whole_pipeline(family)):
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS), saved(TOKENS).logits, atol=1e-5, rtol=1e-5)


def _whole_pipeline(family, seed: int = 0, tp: TensorParallel = SINGLE):
    """The pipeline's layers run one after the other, as the stages would run them (a tied
    head applies its forward_fn to the embedding DeepSpeed shares)."""
    layers = []
    for spec in family.pipeline(seed, tp).layers:
        built = spec.build()
        forward_fn = getattr(spec, "forward_fn", None)
        layers.append(partial(forward_fn, built) if forward_fn else built)

    def run(tokens: torch.Tensor) -> torch.Tensor:
        hidden = tokens
        for layer in layers:
            hidden = layer(hidden)
        return hidden

    return run


def test_an_architecture_without_pieces_trains_whole_and_refuses_to_be_split():
    qwen = {**LLAMA, "architecture": "qwen2"}
    family = family_of(qwen)
    model = family.build(seed=1).eval()
    assert model(TOKENS).shape == (2, 16, 256)
    assert family.size().total == sum(p.numel() for p in model.parameters())
    message = family.layout_problem(pipeline_stages=2, tensor_parallel=1)
    assert "train.pipeline_stages" in message and "qwen2 trains whole" in message


def test_the_planner_counts_every_shipped_model_exactly(shipped_pretrained):
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        job = load_job(path)
        family = model_family(job.model)
        with torch.device("meta"):  # shapes only: the 1.3B-parameter job allocates nothing
            built = family.build(job.train.seed)
        counted = sum(p.numel() for p in built.parameters())
        assert family.size().total == counted, path.name


def test_sizes_follow_the_model():
    """Measured on the meta device: a Llama block's weights (q and o 32×32, k and v 32×16 for
    2 of 4 heads, a 3-matrix MLP of 64) and its two norms; every weight does 2 FLOPs per token,
    attention 4·sequence·width more."""
    size = family_of(LLAMA).size()
    weights = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64
    assert size.block == weights + 2 * 32
    assert size.block_flops == 2 * weights + 4 * 16 * 32
    assert size.head_flops == 2 * 32 * 256
    assert size.block_split == weights
    assert size.shard(2).block == weights // 2 + 2 * 32
    tied = family_of(GPT2).size()
    assert tied.shared == 256 * 32
    assert tied.total == tied.embedding + 3 * tied.block + tied.head - tied.shared


def _tensor_parallel_rank(rank: int, port: int, model: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        family = family_of(model, tensor_parallel=2, num_workers=2)
        tp = TensorParallel(size=2, rank=rank)
        split = family.build(seed=3, tp=tp)
        targets = TOKENS.roll(-1, dims=1)
        loss = language_model_loss(split(TOKENS), targets, tp)
        loss.backward()
        stages = _whole_pipeline(family, 3, tp)
        results = {
            "loss": loss.item(),
            "state": {k: v.detach() for k, v in split.state_dict().items()},
            "stage_loss": language_model_loss(stages(TOKENS), targets, tp).item(),
        }
        Path(out, f"{rank}.pt").write_bytes(pickle.dumps(results))
        dist.barrier()  # neither rank closes its connections while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_tensor_parallel_shards_are_the_whole_model_cut_in_two(name, tmp_path):
    family = family_of(MODELS[name])
    whole = family.build(seed=3)
    loss = language_model_loss(whole(TOKENS), TOKENS.roll(-1, dims=1))
    mp.spawn(
        _tensor_parallel_rank,
        args=(free_port(), MODELS[name], str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [pickle.loads((tmp_path / f"{rank}.pt").read_bytes()) for rank in range(2)]
    joined = join_shards([r["state"] for r in ranks], family.sharding)
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(joined[key], value, rtol=0, atol=0, msg=key)
    for rank in ranks:
        assert rank["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert rank["stage_loss"] == pytest.approx(loss.item(), rel=1e-5)


def bad(write_job, model: dict, **train) -> str:
    path = write_job({"name": "bad", "model": model, "train": train, "storage": "never"})
    with pytest.raises(SpecError) as caught:
        load_job(path)
    message = str(caught.value)
    assert str(path) in message, "the error names the file"
    assert not (path.parent / "never").exists(), "nothing is written"
    return message


def test_an_unknown_architecture_suggests_one(write_job):
    message = bad(write_job, {**LLAMA, "architecture": "lama"})
    assert "model.architecture: 'lama' is not a causal language model" in message
    assert "Did you mean 'llama'" in message


def test_a_config_field_the_architecture_lacks_is_named(write_job):
    message = bad(write_job, {**LLAMA, "config": {**LLAMA["config"], "hiden_size": 8}})
    assert "model.config.hiden_size: llama has no such config field" in message
    assert "Did you mean 'hidden_size'?" in message


def test_an_impossible_config_is_a_spec_error(write_job):
    message = bad(write_job, {**LLAMA, "config": {**LLAMA["config"], "num_attention_heads": 5}})
    assert (
        "model.config" in message and "not a multiple of the number of attention heads" in message
    )


def test_remote_code_is_never_allowed(write_job, tmp_path):
    message = bad(write_job, {**LLAMA, "trust_remote_code": True})
    assert "model.trust_remote_code: true is not allowed" in message
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "x.Y"}})
    )
    message = bad(write_job, {"type": "huggingface", "path": str(folder)})
    assert "auto_map" in message and "never runs" in message


def test_pickled_weights_are_refused(write_job, tmp_path):
    folder = tmp_path / "pickled"
    family = family_of(LLAMA)
    family.config.save_pretrained(folder)
    torch.save({}, folder / "pytorch_model.bin")
    message = bad(write_job, {"type": "huggingface", "path": str(folder)})
    assert "pytorch_model.bin" in message and "safetensors only" in message


def test_a_missing_shard_is_named(write_job, tmp_path):
    config = model_family(JobSpec.model_validate({"name": "m", "model": LLAMA}).model).config
    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[1].unlink()
    message = bad(write_job, {"type": "huggingface", "path": str(folder)})
    assert f"missing 1 of the {len(shards)} shards" in message and shards[1].name in message


def test_weights_that_do_not_fit_the_config_are_named(write_job, shipped_pretrained):
    model = {"type": "huggingface", "path": str(shipped_pretrained)}
    message = bad(write_job, {**model, "config": {"intermediate_size": 100}})
    assert "has shape" in message and "needs" in message


def test_a_folder_without_config_is_named(write_job, tmp_path):
    message = bad(write_job, {"type": "huggingface", "path": str(tmp_path)})
    assert "has no config.json" in message


def test_a_factory_that_does_not_import_is_a_spec_error(write_job):
    message = bad(write_job, {"type": "python", "factory": "no_such_package.models:build"})
    assert "model.factory: 'no_such_package.models:build' does not import" in message
    message = bad(write_job, {"type": "python", "factory": "tests.factories:missing"})
    assert "has no function 'missing'" in message


def test_a_factory_must_return_a_module_with_the_vocabulary(write_job):
    message = bad(write_job, {"type": "python", "factory": "tests.factories:not_a_module"})
    assert "returned a str, not a torch.nn.Module" in message
    message = bad(write_job, {"type": "python", "factory": "tests.factories:small_vocabulary"})
    assert "returned shape (1, 128, 100)" in message and "(1, 128, 256)" in message


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(write_job):
    message = bad(write_job, {**LLAMA, "config": {**LLAMA["config"], "vocab_size": 100}})
    assert "model.config.vocab_size: 100 is smaller than the tokenizer's 256 tokens" in message


def test_layouts_a_model_cannot_take_are_refused_with_the_reason(write_job):
    bigram = {"type": "python", "factory": "tests.factories:bigram"}
    message = bad(write_job, bigram, tensor_parallel=2, num_workers=2)
    assert "cannot split a factory's module" in message
    message = bad(write_job, bigram, pipeline_stages=2, num_workers=2)
    assert "needs the factory to return an nn.Sequential" in message
    message = bad(write_job, LLAMA, tensor_parallel=4, num_workers=4)
    assert "train.tensor_parallel: 4 does not divide the model's num_key_value_heads 2" in message
    message = bad(write_job, LLAMA, pipeline_stages=4, num_workers=4)
    assert "train.pipeline_stages: 4 is more than the model's 3 layers" in message
    message = bad(write_job, {**LLAMA, "architecture": "qwen2"}, pipeline_stages=2, num_workers=2)
    assert "qwen2 trains whole" in message


def test_the_cli_prints_a_model_error_without_a_traceback(write_job, capsys):
    path = write_job({"name": "bad", "model": {**LLAMA, "architecture": "gpt"}})
    assert main(["plan", str(path)]) == 2
    error = capsys.readouterr().err
    assert "model.architecture: 'gpt' is not a causal language model" in error
    assert "Traceback" not in error
