"""Shipyard's built-in GPT: built from a few numbers, exported as a Hugging Face GPT-2."""

from shipyard.models.gpt.model import GPT, Block, Embedding, Head, layer_recipes

__all__ = ["GPT", "Block", "Embedding", "Head", "layer_recipes"]
