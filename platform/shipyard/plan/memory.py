"""How many bytes a rank needs: model states by the ZeRO paper's formulas, plus activations.

Model states under mixed-precision Adam (Rajbhandari et al. 2020, "ZeRO", section 3.1) are
2Ψ bytes of 16-bit parameters, 2Ψ of 16-bit gradients and KΨ of optimizer state, with K = 12
(fp32 master weights, momentum and variance). ZeRO stage 1 divides the optimizer state by the
data-parallel degree Nd, stage 2 the gradients too, stage 3 the parameters too. In plain fp32
training parameters and gradients take 4 bytes each and Adam keeps 8 (no master copy).

Activations per transformer layer follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"): 34·s·b·h bytes in 16 bits with fused attention
(the 5·a·s²·b term of materialised attention scores is gone with SDPA/flash attention), and
only the layer input, 2·s·b·h, when the layer is recomputed (activation checkpointing).
Under tensor parallelism t (no sequence parallelism) the same paper gives s·b·h·(10 + 24/t):
the layer norms, residuals and dropout masks stay whole on every rank, the rest is split.
"""

from __future__ import annotations

from dataclasses import dataclass

from shipyard.models.size import ModelSize

GIB = 1024**3
VALUE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # one weight, gradient or activation
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce/all-gather bucket size


@dataclass(frozen=True)
class ModelStates:
    """Bytes of parameters, gradients and optimizer state one rank keeps, on device and host."""

    parameters: float
    gradients: float
    optimizer: float
    host: float  # what offload moved to CPU memory

    @property
    def device(self) -> float:
        return self.parameters + self.gradients + self.optimizer


def model_state_bytes(
    parameters: float,
    precision: str,
    zero_stage: int,
    data_parallel_size: int,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
) -> ModelStates:
    """The ZeRO paper's per-rank model states for `parameters` held by this rank's stage."""
    mixed = precision in ("bf16", "fp16")
    weight_bytes, optimizer_bytes = (2, 12) if mixed else (4, 8)
    shards = data_parallel_size
    weights = weight_bytes * parameters / (shards if zero_stage >= 3 else 1)
    gradients = weight_bytes * parameters / (shards if zero_stage >= 2 else 1)
    optimizer = optimizer_bytes * parameters / (shards if zero_stage >= 1 else 1)
    host = 0.0
    if offload_optimizer:
        host += optimizer
        optimizer = 0.0
    if offload_parameters:
        host += weights
        weights = 0.0
    return ModelStates(weights, gradients, optimizer, host)


def activation_bytes_per_layer(
    size: ModelSize, micro_batch_size: int, precision: str, checkpointing: bool
) -> float:
    """Activations one block keeps for backward, per micro-batch (on one tensor-parallel rank
    of `size`)."""
    scale = VALUE_BYTES[precision] / 2  # the sizes are for 16-bit activations
    per_token = size.activation_per_token(checkpointing)
    return scale * per_token * size.sequence_length * micro_batch_size


def bucket_bytes(parameters: float, precision: str, zero_stage: int) -> float:
    """DeepSpeed's gradient reduce bucket (and ZeRO-3's prefetch), capped by the model size."""
    if zero_stage == 0:
        return 0.0
    return min(parameters, DEEPSPEED_BUCKET_ELEMENTS) * VALUE_BYTES[precision]


@dataclass(frozen=True)
class RankMemory:
    """One rank's estimated peak memory, in bytes, on its device and on its host."""

    model_states: ModelStates
    activations: float
    transient: float

    @property
    def device(self) -> float:
        return self.model_states.device + self.activations + self.transient

    @property
    def host(self) -> float:
        return self.model_states.host


def rank_memory(
    size: ModelSize,
    *,
    layers: int,
    has_embedding: bool,
    has_head: bool,
    micro_batch_size: int,
    in_flight: int,
    precision: str,
    checkpointing: bool,
    zero_stage: int,
    data_parallel_size: int,
    offload_optimizer: bool,
    offload_parameters: bool,
) -> RankMemory:
    """Peak memory of a rank holding `layers` blocks (and the embedding/head if it has them);
    `size` is what one rank holds (`ModelSize.shard` under tensor parallelism).

    `in_flight` is how many micro-batches' activations wait for their backward: 1 without a
    pipeline; under 1F1B, stage i of p keeps min(p - i, micro-batches) of them.
    """
    parameters = size.held(layers, has_embedding, has_head)
    states = model_state_bytes(
        parameters,
        precision,
        zero_stage,
        data_parallel_size,
        offload_optimizer,
        offload_parameters,
    )
    kept = layers * activation_bytes_per_layer(size, micro_batch_size, precision, checkpointing)
    transient = bucket_bytes(parameters, precision, zero_stage)
    if zero_stage == 3:  # a block's gathered weights, and the next one prefetched
        transient += 2 * size.block * VALUE_BYTES[precision]
    if checkpointing and layers:
        transient += activation_bytes_per_layer(size, micro_batch_size, precision, False)
    if has_head:
        tokens = size.sequence_length * micro_batch_size
        vocabulary = size.vocabulary_size / size.tensor_parallel  # this rank's logits
        transient += tokens * vocabulary * (VALUE_BYTES[precision] + 8)
    return RankMemory(states, in_flight * kept, transient)
