"""The built-in GPT as a Hugging Face GPT-2: the same architecture, weights renamed.

Shipyard's GPT is GPT-2's: learned positions, pre-norm blocks with a fused query-key-value
projection, a 4× MLP, a final layer norm. Two choices differ from GPT-2's defaults and are set
in the config instead: its GELU is the exact one (`activation_function: gelu`, not
`gelu_new`), and its output projection is its own matrix (`tie_word_embeddings: false`).
GPT-2 stores its projections as Conv1D, (in, out): they are transposed on the way.
"""

from __future__ import annotations

import re

import torch

from shipyard.spec.model import GptModelSpec

_BLOCK = {  # GPT block parameter -> GPT-2 block parameter, and whether it is transposed
    "attention_norm.weight": ("ln_1.weight", False),
    "attention_norm.bias": ("ln_1.bias", False),
    "qkv.weight": ("attn.c_attn.weight", True),
    "qkv.bias": ("attn.c_attn.bias", False),
    "attention_out.weight": ("attn.c_proj.weight", True),
    "attention_out.bias": ("attn.c_proj.bias", False),
    "mlp_norm.weight": ("ln_2.weight", False),
    "mlp_norm.bias": ("ln_2.bias", False),
    "mlp_in.weight": ("mlp.c_fc.weight", True),
    "mlp_in.bias": ("mlp.c_fc.bias", False),
    "mlp_out.weight": ("mlp.c_proj.weight", True),
    "mlp_out.bias": ("mlp.c_proj.bias", False),
}
_NAME = re.compile(r"layers\.(\d+)\.(.+)")


def gpt2_config(spec: GptModelSpec, end_of_text: int | None = None):
    """The transformers GPT2Config of the same model (ending generation at the tokenizer's
    end-of-text token, if it has one)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=spec.vocabulary_size,
        n_positions=spec.sequence_length,
        n_embd=spec.width,
        n_layer=spec.layers,
        n_head=spec.heads,
        n_inner=4 * spec.width,
        activation_function="gelu",
        resid_pdrop=spec.dropout,
        embd_pdrop=spec.dropout,
        attn_pdrop=spec.dropout,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=end_of_text,
        architectures=["GPT2LMHeadModel"],
    )


def to_gpt2(state: dict[str, torch.Tensor], spec: GptModelSpec) -> dict[str, torch.Tensor]:
    """GPT weights (named as `GPT.state_dict()`) as GPT2LMHeadModel's."""
    head = spec.layers + 1
    renamed = {}
    for name, tensor in state.items():
        index, rest = _split(name)
        if index == 0:
            key = {"tokens.weight": "wte.weight", "positions.weight": "wpe.weight"}[rest]
            renamed[f"transformer.{key}"] = tensor
        elif index == head:
            key = {"norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias"}.get(rest)
            renamed[f"transformer.{key}" if key else "lm_head.weight"] = tensor
        else:
            target, transposed = _BLOCK[rest]
            renamed[f"transformer.h.{index - 1}.{target}"] = tensor.t() if transposed else tensor
    return {name: tensor.contiguous() for name, tensor in renamed.items()}


def from_gpt2(state: dict[str, torch.Tensor], spec: GptModelSpec) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's weights back as the GPT's (the inverse of `to_gpt2`)."""
    back = {"transformer.wte.weight": "layers.0.tokens.weight"}
    back["transformer.wpe.weight"] = "layers.0.positions.weight"
    head = spec.layers + 1
    back |= {
        "transformer.ln_f.weight": f"layers.{head}.norm.weight",
        "transformer.ln_f.bias": f"layers.{head}.norm.bias",
        "lm_head.weight": f"layers.{head}.logits.weight",
    }
    renamed = {}
    for name, tensor in state.items():
        if name in back:
            renamed[back[name]] = tensor
            continue
        match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
        for ours, (theirs, transposed) in _BLOCK.items():
            if match and match.group(2) == theirs:
                key = f"layers.{int(match.group(1)) + 1}.{ours}"
                renamed[key] = (tensor.t() if transposed else tensor).contiguous()
    return renamed


def _split(name: str) -> tuple[int, str]:
    match = _NAME.fullmatch(name)
    if not match:
        raise KeyError(f"{name} is not a GPT weight")
    return int(match.group(1)), match.group(2)
