"""KV-cache generation: equal to recomputing the whole prefix, and identical alone or batched."""

from __future__ import annotations

import asyncio

import pytest
import torch

from shipyard.models.gpt import GPT
from shipyard.models.gpt.generation import TextGenerator
from shipyard.models.sampling import BrokenModelError, GenerationRequest
from shipyard.serve.batching import ContinuousBatcher
from shipyard.spec.job import GptModelSpec

SPEC = GptModelSpec(layers=2, heads=4, width=64, sequence_length=48)


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT(SPEC, seed=5).eval()


def full_prefix_greedy(
    model: GPT, prompt: bytes, count: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding the slow way: the whole sequence through the model for every token."""
    tokens, produced, logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(count):
            last = model(torch.tensor([tokens]))[0, -1, :256]
            logits.append(last)
            produced.append(int(last.argmax()))
            tokens.append(produced[-1])
    return produced, logits


def test_cached_decoding_equals_recomputing_the_prefix(model):
    generator = TextGenerator(model, SPEC.sequence_length)
    expected, _ = full_prefix_greedy(model, b"def main():", 30)
    assert generator.generate([GenerationRequest(tuple(b"def main():"), 30)]) == [expected]


def test_batched_requests_get_exactly_their_alone_answers(model):
    generator = TextGenerator(model, SPEC.sequence_length)
    requests = [
        GenerationRequest(tuple(b"import os\n"), 20),
        GenerationRequest(tuple(b"x"), 35, temperature=0.9, seed=3),
        GenerationRequest(tuple(b"class Parser:\n    def"), 9, temperature=1.3, top_k=5, seed=8),
        GenerationRequest(tuple(b"for i in range(10):"), 25, temperature=0.0),
        GenerationRequest(tuple(b"x"), 35, temperature=0.9, seed=4),
    ]
    alone = [generator.generate([request])[0] for request in requests]
    assert generator.generate(requests) == alone
    assert generator.generate(requests[::-1]) == alone[::-1]
    assert [len(tokens) for tokens in alone] == [20, 35, 9, 25, 35]
    assert alone[1] != alone[4], "different seeds sample different continuations"


def test_top_k_one_is_greedy_and_tokens_stay_bytes(model):
    generator = TextGenerator(model, SPEC.sequence_length)
    greedy = generator.generate([GenerationRequest(tuple(b"abc"), 20)])[0]
    top1 = generator.generate([GenerationRequest(tuple(b"abc"), 20, temperature=2.0, top_k=1)])[0]
    hot = generator.generate([GenerationRequest(tuple(b"abc"), 40, temperature=50.0, seed=1)])[0]
    assert top1 == greedy
    assert all(0 <= token < 256 for token in hot)
    assert len(set(hot)) > 10, "a very high temperature samples widely"


def test_too_long_a_request_is_refused(model):
    generator = TextGenerator(model, SPEC.sequence_length)
    with pytest.raises(ValueError, match="exceed the context length 48"):
        generator.generate([GenerationRequest(tuple(b"a" * 40), 9)])


def test_corrupt_weights_are_detected():
    broken = GPT(SPEC, seed=5).eval()
    generator = TextGenerator(broken, SPEC.sequence_length)
    generator.check()
    with torch.no_grad():
        broken.layers[1].mlp_in.weight.fill_(float("nan"))
    with pytest.raises(BrokenModelError):
        generator.check()
    with pytest.raises(BrokenModelError):
        generator.generate([GenerationRequest(tuple(b"abc"), 4)])


def test_requests_joining_a_running_batch_get_their_alone_answers(model):
    """Continuous batching: later requests join between steps; nobody's tokens change."""
    generator = TextGenerator(model, SPEC.sequence_length)
    requests = [
        GenerationRequest(tuple(b"while "), 30),
        GenerationRequest(tuple(b"if x:"), 12, temperature=0.7, seed=2),
        GenerationRequest(tuple(b"def "), 20),
        GenerationRequest(tuple(b"z"), 5, temperature=1.1, top_k=7, seed=9),
    ]
    alone = [generator.generate([request])[0] for request in requests]

    async def collect(stream) -> tuple[list[int], int]:
        tokens = [token async for step in stream for token in step]
        return tokens, stream.finished.batch_size

    async def arrive_in_waves():
        batcher = ContinuousBatcher(generator, max_batch_size=3)
        first = [batcher.submit(request) for request in requests[:2]]
        while batcher.stats.steps < 3:  # a few steps run before the others arrive
            await asyncio.sleep(0.001)
        later = [batcher.submit(request) for request in requests[2:]]
        return await asyncio.gather(*(collect(stream) for stream in first + later))

    generated = asyncio.run(arrive_in_waves())
    assert [tokens for tokens, _ in generated] == alone
    assert max(size for _, size in generated) == 3, "capped at max_batch_size"
    assert min(size for _, size in generated) >= 2, "they shared steps"


def test_a_cancelled_stream_leaves_the_batch_at_the_next_step(model):
    """A client gone (or a stop string found): its sequence is not decoded any further, and
    the sequence sharing its steps is unchanged."""
    generator = TextGenerator(model, SPEC.sequence_length)
    staying = GenerationRequest(tuple(b"def "), 20)
    alone = generator.generate([staying])[0]

    async def one_leaves():
        batcher = ContinuousBatcher(generator, max_batch_size=4)
        stays = batcher.submit(staying)
        leaves = batcher.submit(GenerationRequest(tuple(b"if "), 20))
        await leaves.__anext__()
        leaves.cancel()
        tokens = [token async for step in stays for token in step]
        return tokens, batcher.stats

    tokens, stats = asyncio.run(one_leaves())
    assert tokens == alone
    assert stats.abandoned == 1
    assert stats.decoded_tokens < 20 + 5, "the leaver got at most a step or two more"
