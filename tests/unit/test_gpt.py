"""The GPT built from config: shapes, layout-independent initialisation, checkpointing."""

from __future__ import annotations

import torch

from shipyard.models.gpt import GPT, layer_recipes
from shipyard.models.loss import language_model_loss
from shipyard.spec.job import GptModelSpec

SPEC = GptModelSpec(layers=3, heads=2, width=16, sequence_length=12)


def tokens(batch=2, length=12):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))


def test_forward_gives_logits_over_the_byte_vocabulary():
    logits = GPT(SPEC, seed=0)(tokens())
    assert logits.shape == (2, 12, 256)
    loss = language_model_loss(logits[:, :-1], tokens()[:, 1:])
    # An untrained model is close to uniform over 256 tokens.
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


def test_each_layer_initialises_the_same_however_the_model_is_built():
    whole = GPT(SPEC, seed=3)
    torch.manual_seed(12345)  # global RNG state must not matter
    for index, (cls, *args) in enumerate(layer_recipes(SPEC, seed=3)):
        alone = cls(*args)
        for (name, a), (_, b) in zip(
            alone.named_parameters(), whole.layers[index].named_parameters(), strict=True
        ):
            assert torch.equal(a, b), f"layer {index} {name}"


def test_seed_changes_the_weights():
    a, b = GPT(SPEC, seed=0), GPT(SPEC, seed=1)
    assert not torch.equal(a.layers[1].qkv.weight, b.layers[1].qkv.weight)


def test_attention_is_causal():
    model = GPT(SPEC, seed=0).eval()
    x = tokens(1)
    changed = x.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :-1], model(changed)[0, :-1])


def test_activation_checkpointing_gives_the_same_gradients():
    plain = GPT(SPEC, seed=0)
    checkpointed = GPT(SPEC.model_copy(update={"activation_checkpointing": True}), seed=0)
    for model in (plain, checkpointed):
        language_model_loss(model(tokens())[:, :-1], tokens()[:, 1:]).backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
