"""What the planner needs to know of a model: its parameters, FLOPs and activations, by piece.

Every model family describes itself as pieces: the input pieces (embeddings), `layers` equal
blocks, and the output pieces (final norm, logits). The planner splits blocks over pipeline
stages, gives the first stage the input pieces and the last stage the output pieces, and
estimates each rank's memory and time from these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Korthikanti et al. 2022: of a transformer block's 34·s·b·h activation bytes (16-bit), the
# layer norms, residuals and dropout masks (10) stay whole on every tensor-parallel rank and the
# rest (24) is split.
REPLICATED_ACTIVATION_SHARE = 10 / 34


@dataclass(frozen=True)
class ModelSize:
    """A model's pieces as the planner sees them; counts are per tensor-parallel rank after
    `shard`."""

    embedding: int  # parameters of the input pieces
    block: int  # parameters of one block
    head: int  # parameters of the output pieces
    layers: int
    width: int  # the hidden size passed between blocks (and between pipeline stages)
    sequence_length: int
    vocabulary_size: int
    block_flops: float  # forward FLOPs of one block per token, at sequence_length
    head_flops: float  # forward FLOPs of the output pieces per token
    block_activation: float  # bytes one block keeps for backward per token, in 16-bit training
    shared: int = 0  # parameters both the input and the output pieces hold (tied embeddings)
    embedding_split: int = 0  # of `embedding`, parameters tensor parallelism splits
    block_split: int = 0  # of `block`, parameters tensor parallelism splits
    head_split: int = 0  # of `head`, parameters tensor parallelism splits
    tensor_parallel: int = 1

    @property
    def total(self) -> int:
        """Every parameter once (a tied embedding counts once)."""
        return self.embedding + self.block * self.layers + self.head - self.shared

    def shard(self, tensor_parallel: int) -> ModelSize:
        """The counts one of `tensor_parallel` ranks holds: the split parameters divided, the
        rest (norms, position embeddings, row-parallel biases) whole."""
        if tensor_parallel == 1:
            return self
        t = tensor_parallel

        def share(count: int, split: int) -> int:
            return split // t + count - split

        return replace(
            self,
            embedding=share(self.embedding, self.embedding_split),
            block=share(self.block, self.block_split),
            head=share(self.head, self.head_split),
            shared=self.shared // t,
            embedding_split=self.embedding_split // t,
            block_split=self.block_split // t,
            head_split=self.head_split // t,
            tensor_parallel=t,
        )

    def held(self, layers: int, has_embedding: bool, has_head: bool) -> int:
        """Parameters of a rank (or pipeline stage) holding `layers` blocks, and maybe the
        input and the output pieces (a stage holding both holds a tied weight once)."""
        both = has_embedding and has_head
        return (
            layers * self.block
            + (self.embedding if has_embedding else 0)
            + (self.head if has_head else 0)
            - (self.shared if both else 0)
        )

    def activation_per_token(self, checkpointing: bool) -> float:
        """16-bit bytes one block of this rank keeps for backward per token: only its input
        when it is recomputed, else its share of what it keeps under tensor parallelism."""
        if checkpointing:
            return 2 * self.width
        t = self.tensor_parallel
        return self.block_activation * (
            REPLICATED_ACTIVATION_SHARE + (1 - REPLICATED_ACTIVATION_SHARE) / t
        )
