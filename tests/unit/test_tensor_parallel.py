"""Tensor parallelism: a tp=2 GPT on two gloo processes is the tp=1 GPT cut in two.

Each check runs the same batch through the whole model in this process and through its two
halves on two real processes (torch.distributed over 127.0.0.1), then compares.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shipyard.models.gpt import GPT
from shipyard.models.gpt.generation import GenerationRequest, TextGenerator
from shipyard.models.loss import language_model_loss
from shipyard.models.tensor_parallel import (
    SINGLE,
    TensorParallel,
    gather_last_dim,
    join_shards,
    sharding_of,
    unshard,
)
from shipyard.runtime.local import free_port
from shipyard.spec.job import GptModelSpec

SPEC = GptModelSpec(layers=2, heads=4, width=32, sequence_length=16)
SEED = 5


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.randint(0, SPEC.vocabulary_size, (3, SPEC.sequence_length + 1))
    return windows[:, :-1], windows[:, 1:]


def _rank_main(rank: int, port: int, spec: GptModelSpec, tokens, targets, out: str) -> None:
    """One rank of a tp=2 group: its model's shares, logits, loss and gradients, pickled."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        tp = TensorParallel(size=2, rank=rank)
        model = GPT(spec, SEED, tp)
        initial = {name: p.detach().clone() for name, p in model.named_parameters()}
        logits = model(tokens)
        loss = language_model_loss(logits, targets, tp)
        loss.backward()
        model.train()
        torch.manual_seed(123)  # the generator every rank of the group shares
        with torch.no_grad():
            dropped = model.layers[1](model.layers[0](tokens))
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.eval()
        fit_the_batch(model, tokens, targets, tp)
        results = {
            "initial": initial,
            "logits": logits.detach(),
            "loss": loss.item(),
            "grads": grads,
            "dropped": dropped,
            "trained": {name: p.detach() for name, p in model.named_parameters()},
            "greedy": greedy(model, tp),
        }
        Path(out, f"{rank}.pt").write_bytes(pickle.dumps(results))
        dist.barrier()  # neither rank closes its connections while the other still uses them
    finally:
        dist.destroy_process_group()


def fit_the_batch(model, tokens, targets, tp=SINGLE, steps: int = 20) -> None:
    """Plain SGD on one batch, so that the weights are no longer their initial values."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(steps):
        optimizer.zero_grad()
        language_model_loss(model(tokens), targets, tp).backward()
        optimizer.step()


@torch.no_grad()
def greedy(model, tp=SINGLE, prompt: bytes = b"def ", new_tokens: int = 10) -> list[int]:
    """Greedy continuation by running the (split) model on the whole sequence each time."""
    sequence = list(prompt)
    for _ in range(new_tokens):
        logits = gather_last_dim(model(torch.tensor([sequence]))[0, -1], tp)
        sequence.append(int(logits.argmax()))
    return sequence[len(prompt) :]


def run_tp2(tmp_path: Path, spec: GptModelSpec, tokens, targets) -> list[dict]:
    mp.spawn(
        _rank_main, args=(free_port(), spec, tokens, targets, str(tmp_path)), nprocs=2, join=True
    )
    return [pickle.loads((tmp_path / f"{rank}.pt").read_bytes()) for rank in range(2)]


def gathered(shares: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full tensors from both ranks' shares (replicated ones must already agree)."""
    full = {}
    for name, first in shares[0].items():
        split = sharding_of(name)
        if split:
            full[name] = unshard([share[name] for share in shares], *split)
        else:
            torch.testing.assert_close(first, shares[1][name], rtol=0, atol=0)
            full[name] = first
    return full


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """The dropout-free spec's tp=1 model, loss and gradients beside the tp=2 ranks' results."""
    torch.manual_seed(0)
    tokens, targets = batch()
    whole = GPT(SPEC, SEED)
    whole.eval()
    logits = whole(tokens)
    loss = language_model_loss(logits, targets)
    loss.backward()
    ranks = run_tp2(tmp_path_factory.mktemp("tp2"), SPEC, tokens, targets)
    return whole, logits.detach(), loss.item(), ranks


def test_split_initialisation_is_the_whole_model_cut_in_two(tp2):
    whole, _, _, ranks = tp2
    full = gathered([rank["initial"] for rank in ranks])
    expected = dict(whole.named_parameters())
    assert full.keys() == expected.keys()
    for name, tensor in full.items():
        torch.testing.assert_close(tensor, expected[name].detach(), rtol=0, atol=0, msg=name)
    # each rank holds half of every split weight
    qkv = ranks[0]["initial"]["layers.1.qkv.weight"]
    assert qkv.shape == (3 * SPEC.width // 2, SPEC.width)


def test_split_forward_gives_the_same_logits_and_loss(tp2):
    _, logits, loss, ranks = tp2
    # the head's logits are split by vocabulary: rank 0 has the first half of the bytes
    full_logits = torch.cat([rank["logits"] for rank in ranks], dim=-1)
    torch.testing.assert_close(full_logits, logits, rtol=1e-5, atol=1e-5)
    for rank in ranks:
        assert rank["loss"] == pytest.approx(loss, rel=1e-6)


def test_split_backward_gives_the_same_gradients(tp2):
    whole, _, _, ranks = tp2
    grads = {name: p.grad for name, p in whole.named_parameters()}
    full = {}
    for name in grads:
        split = sharding_of(name)
        shares = [rank["grads"][name] for rank in ranks]
        if split:
            full[name] = unshard(shares, *split)
        else:  # a replicated weight gets the whole gradient on every rank
            torch.testing.assert_close(shares[0], shares[1], rtol=1e-5, atol=1e-7)
            full[name] = shares[0]
    for name, grad in grads.items():
        torch.testing.assert_close(full[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_keeps_the_residual_stream_identical_across_ranks(tmp_path):
    """Dropout on: the attention's split heads drop patterns of their own, yet every rank ends
    the block with the same hidden state, as the next block's replicated weights require."""
    spec = SPEC.model_copy(update={"dropout": 0.2})
    tokens, targets = batch()
    ranks = run_tp2(tmp_path, spec, tokens, targets)
    torch.testing.assert_close(ranks[0]["dropped"], ranks[1]["dropped"], rtol=0, atol=0)


def test_consolidated_shards_serve_the_greedy_answers_of_the_split_model(tp2):
    """After training, the shards joined as export does give a tp=1 GPT that the serving
    generator (KV cache, batched decode) answers exactly as the split model did."""
    _, _, _, ranks = tp2
    model = GPT(SPEC, seed=0)
    model.load_state_dict(join_shards([rank["trained"] for rank in ranks]))
    served = TextGenerator(model, SPEC.sequence_length).generate(
        [GenerationRequest(tuple(b"def "), 10)]
    )
    assert served == [ranks[0]["greedy"]] == [ranks[1]["greedy"]]
    initial = gathered([rank["initial"] for rank in ranks])
    assert any(not torch.equal(model.state_dict()[k], initial[k]) for k in initial), "trained"
