"""The job spec: a typed, validated model of `jobs/*.yaml`.

Every field checks itself; rules that tie fields together live in `model_validator`s and
name each field by its full dotted path, so the loader can report them as they are.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from shipyard.spec.data import (
    PYTHON_STDLIB,
    DataSpec,
    TokenizerSpec,
    tokenizer_document,
)
from shipyard.spec.model import (
    BYTE_VOCABULARY,
    GptModelSpec,
    ModelSpec,
    Strict,
    divisors,
    with_default_type,
)
from shipyard.spec.tracking import TrackingSpec

__all__ = [
    "BYTE_VOCABULARY",
    "PYTHON_STDLIB",
    "DataSpec",
    "GptModelSpec",
    "JobSpec",
    "ModelSpec",
    "TokenizerSpec",
]


class TrainSpec(Strict):
    """How to train: parallelism, precision, batch, optimizer, schedule, and cadence."""

    parallelism: Literal["manual", "auto"] = Field(
        "manual",
        description="manual: the workers, stages, ZeRO stage, accumulation and offload below; "
        "auto: on a cluster, the planner picks them (keeping the global batch).",
    )
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = False
    offload_parameters: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    global_batch_size: int | None = Field(None, ge=1)
    pipeline_stages: int = Field(1, ge=1)
    tensor_parallel: int = Field(
        1,
        ge=1,
        description="ranks that split every layer's heads, MLP units and vocabulary (on one "
        "node); workers = data parallel × pipeline_stages × tensor_parallel.",
    )

    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.95,
    )
    gradient_clipping: float = Field(1.0, ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)

    max_steps: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)

    @property
    def data_parallel_size(self) -> int:
        """Model replicas: workers not spent on pipeline stages or tensor-parallel shards."""
        return self.num_workers // (self.pipeline_stages * self.tensor_parallel)

    @model_validator(mode="after")
    def _parallelism_is_consistent(self) -> TrainSpec:
        model_parallel = self.pipeline_stages * self.tensor_parallel
        if self.num_workers % model_parallel:
            raise ValueError(
                f"train.num_workers: {self.num_workers} is not divisible by "
                f"train.pipeline_stages {self.pipeline_stages} × train.tensor_parallel "
                f"{self.tensor_parallel}. To fix: use a multiple of {model_parallel} workers."
            )
        if self.tensor_parallel > 1 and self.zero_stage == 3:
            raise ValueError(
                f"train.zero_stage: 3 cannot be combined with train.tensor_parallel "
                f"{self.tensor_parallel}: Shipyard's tensor-parallel layers are trained with "
                "ZeRO 0, 1 or 2 (ZeRO-3 would partition the shards again). To fix: set "
                "zero_stage to 2 or lower, or tensor_parallel to 1."
            )
        if self.pipeline_stages > 1 and self.zero_stage > 1:
            raise ValueError(
                f"train.zero_stage: {self.zero_stage} cannot be combined with "
                f"train.pipeline_stages {self.pipeline_stages}; DeepSpeed's pipeline engine "
                "allows zero_stage 0 or 1. To fix: set zero_stage to 0 or 1, or pipeline_stages "
                "to 1."
            )
        if self.offload_parameters and self.zero_stage != 3:
            raise ValueError(
                f"train.offload_parameters: parameter offload needs train.zero_stage 3, got "
                f"{self.zero_stage}. To fix: set zero_stage: 3 or offload_parameters: false."
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(
                "train.offload_optimizer: optimizer offload needs train.zero_stage 1, 2 or 3, "
                "got 0. To fix: raise zero_stage or set offload_optimizer: false."
            )
        if self.precision == "fp16" and self.gpus_per_worker == 0:
            raise ValueError(
                "train.precision: fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16), "
                "but train.gpus_per_worker is 0. To fix: use precision bf16 or fp32 on CPU."
            )
        expected = self.micro_batch_size * self.gradient_accumulation * self.data_parallel_size
        # Under auto parallelism the planner picks the micro-batch, accumulation and workers.
        auto = self.parallelism == "auto"
        if self.global_batch_size is not None and self.global_batch_size != expected and not auto:
            raise ValueError(
                f"train.global_batch_size: {self.global_batch_size} does not equal "
                f"micro_batch_size {self.micro_batch_size} × gradient_accumulation "
                f"{self.gradient_accumulation} × data-parallel workers {self.data_parallel_size} "
                f"= {expected}. To fix: set it to {expected}, or remove it."
            )
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"train.warmup_steps: {self.warmup_steps} is longer than train.max_steps "
                f"{self.max_steps}. To fix: use at most {self.max_steps} warmup steps."
            )
        return self


_AUTOSCALING_FIELDS = (
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "look_back_period_s",
    "metrics_interval_s",
)


class ServeSpec(Strict):
    """How `shipyard serve` deploys the trained model on Ray Serve.

    Either a fixed `num_replicas`, or autoscaling between `min_replicas` and `max_replicas`
    aiming at `target_ongoing_requests` per replica (Ray Serve's own names and meaning).
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_replicas: int | None = Field(None, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    max_batch_size: int = Field(8, ge=1, description="sequences decoding together; 1: no batching")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="an idle replica waits this long for company before decoding"
    )
    max_queued_requests: int = Field(
        32, ge=0, description="requests a replica holds beyond a full batch; more get a 429"
    )
    request_timeout_s: float = Field(300.0, gt=0, description="a request past it gets a 504")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="a larger body gets a 413")
    max_prompt_tokens: int | None = Field(None, ge=1, description="default: the context")
    max_completion_tokens: int | None = Field(None, ge=1, description="cap on max_tokens")
    default_max_tokens: int = Field(64, ge=1, description="when a request gives no max_tokens")
    chat_template: str | None = Field(
        None, description="Jinja chat template, when the tokenizer has none (or to replace it)"
    )
    api_keys_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the accepted API keys (comma-separated)",
    )
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)

    @property
    def max_ongoing_requests(self) -> int:
        """Serve's per-replica limit: a full batch and its queue, with room for the request
        the replica turns away itself (with a 429 in OpenAI's shape) and for metadata calls."""
        return 2 * (self.max_batch_size + self.max_queued_requests) + 4

    @field_validator("chat_template")
    @classmethod
    def _template_parses(cls, template: str | None) -> str | None:
        if template is not None:
            from shipyard.serve.chat import compile_template

            try:
                compile_template(template)
            except ValueError as error:
                raise ValueError(f"serve.chat_template: not a Jinja template: {error}") from None
        return template

    @property
    def autoscaling(self) -> bool:
        """True unless a fixed number of replicas is given."""
        return self.num_replicas is None

    @model_validator(mode="after")
    def _replicas_are_consistent(self) -> ServeSpec:
        # Compared with the defaults, not with what was typed, so a dumped spec validates again.
        conflicting = [
            name
            for name in _AUTOSCALING_FIELDS
            if getattr(self, name) != type(self).model_fields[name].default
        ]
        if self.num_replicas is not None and conflicting:
            raise ValueError(
                f"serve.num_replicas: a fixed replica count cannot be combined with autoscaling "
                f"(serve.{conflicting[0]} is also set). To fix: remove num_replicas to "
                "autoscale, or remove the autoscaling fields."
            )
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serve.min_replicas: {self.min_replicas} is more than serve.max_replicas "
                f"{self.max_replicas}. To fix: make min_replicas <= max_replicas."
            )
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(
                f"serve.look_back_period_s: {self.look_back_period_s} must be longer than "
                f"serve.metrics_interval_s {self.metrics_interval_s}, or the average has one "
                "sample. To fix: raise look_back_period_s or lower metrics_interval_s."
            )
        return self


class FailureSpec(Strict):
    """How often Ray Train restarts a failed worker group from the last checkpoint."""

    max_failures: int = Field(1, ge=0)


class AshaSpec(Strict):
    """Asynchronous successive halving: at each rung keep the best 1/reduction_factor of trials.

    Rungs are at grace_period × reduction_factor^k steps. `promotion` says how a trial gets
    past one: `pause` is ASHA as Li et al. wrote it (it pauses there, and a free slot resumes
    the best paused trial in the top 1/reduction_factor of all the rung's results before a
    new trial starts; a paused trial resumes from a checkpoint, so its rungs are the first
    checkpoint steps at or after those steps); `percentile` is Tune's ASHAScheduler (it goes
    on at once if it beats that percentile of the results the rung holds so far, so a rung's
    first arrivals always do; no restarts, more steps spent on weak trials).
    """

    grace_period: int = Field(10, ge=1, description="steps every trial trains before a cut")
    reduction_factor: float = Field(3.0, gt=1)
    promotion: Literal["pause", "percentile"] = "pause"


class PbtSpec(Strict):
    """Population-based training: every `perturbation_interval` steps the bottom quantile
    continues from a top trial's checkpoint with perturbed hyperparameters."""

    perturbation_interval: int = Field(20, ge=1, description="in optimizer steps")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    synch: bool = Field(
        False,
        description="synchronous PBT: trials ahead pause at each perturbation until all are "
        "there, so who exploits whom never depends on which trial started first",
    )


class SweepSpec(Strict):
    """`shipyard sweep`: a Ray Tune search in which every trial is a Shipyard training run.

    `space` maps dotted job-spec paths to one distribution each; it is checked against the
    rest of the job when the file is loaded (see shipyard.sweep.search_space).
    """

    space: dict[str, Any]
    metric: Literal["val_loss", "loss"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(4, ge=1, description="trials; with grid entries, repeats of the grid")
    max_concurrent_trials: int | None = Field(None, ge=1)
    search: Literal["random", "optuna"] = "random"
    scheduler: Literal["fifo", "asha", "pbt"] = "fifo"
    asha: AshaSpec | None = None
    pbt: PbtSpec | None = None
    seed: int = Field(0, ge=0, description="seeds the search algorithm (random or optuna)")

    @model_validator(mode="after")
    def _scheduler_settings_match(self) -> SweepSpec:
        for name in ("asha", "pbt"):
            if getattr(self, name) is not None and self.scheduler != name:
                raise ValueError(
                    f"sweep.{name}: settings for the {name} scheduler, but sweep.scheduler is "
                    f"{self.scheduler!r}. To fix: set scheduler: {name}, or remove sweep.{name}."
                )
        if self.scheduler == "pbt" and self.search != "random":
            raise ValueError(
                f"sweep.search: {self.search!r} cannot drive the pbt scheduler, which explores "
                "by itself. To fix: use search: random with scheduler: pbt."
            )
        return self

    @property
    def asha_settings(self) -> AshaSpec:
        """The ASHA settings given, or the defaults."""
        return self.asha or AshaSpec()

    @property
    def pbt_settings(self) -> PbtSpec:
        """The PBT settings given, or the defaults."""
        return self.pbt or PbtSpec()


# A job's sweep lives in the folder `<name>-sweep` beside the job's own run folders.
SWEEP_SUFFIX = "-sweep"


class JobSpec(Strict):
    """One job: what model, on what data, trained how, saved where."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    model: ModelSpec = GptModelSpec()
    data: DataSpec = DataSpec()
    tokenizer: TokenizerSpec | None = Field(
        None,
        description="bytes, {path: FOLDER} or {train: {vocab_size: N}}; by default the model "
        "folder's tokenizer when it has one, else bytes",
    )
    train: TrainSpec = TrainSpec()
    storage: str = Field(
        "runs",
        min_length=1,
        description="Where each job keeps its checkpoints: a folder or s3://bucket/prefix "
        "(S3 endpoint and credentials: the standard AWS settings, e.g. AWS_ENDPOINT_URL).",
    )
    artifacts: str | None = Field(
        None,
        min_length=1,
        description="Where finished models are published: a folder or s3://bucket/prefix "
        "(S3 endpoint and credentials: the standard AWS settings, e.g. AWS_ENDPOINT_URL).",
    )
    failure: FailureSpec = FailureSpec()
    serve: ServeSpec = ServeSpec()
    sweep: SweepSpec | None = None
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("name")
    @classmethod
    def _not_a_sweep_folder(cls, name: str) -> str:
        if name.endswith(SWEEP_SUFFIX):
            raise ValueError(
                f"{name!r} ends in {SWEEP_SUFFIX!r}: the sweep of job {name[: -len(SWEEP_SUFFIX)]!r} "
                "keeps its trials in a folder of that name. To fix: choose another name."
            )
        return name

    @field_validator("model", mode="before")
    @classmethod
    def _gpt_by_default(cls, document: Any) -> Any:
        return with_default_type(document)

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _bytes_by_name(cls, document: Any) -> Any:
        return tokenizer_document(document)

    @model_validator(mode="after")
    def _fits_the_model(self) -> JobSpec:
        if isinstance(self.model, GptModelSpec):
            _check_gpt_layout(self.model, self.train)
        for field_name in ("storage", "artifacts"):
            location = getattr(self, field_name)
            if location and "://" in location and not _is_s3_bucket(location):
                raise ValueError(
                    f"{field_name}: {location!r} is not allowed; a folder or s3://bucket/prefix "
                    "is. To fix: use an S3 (or S3-compatible) bucket, or a folder."
                )
        if self.sweep is not None:
            _check_sweep_cadence(self.sweep, self.train)
        return self


def _check_gpt_layout(model: GptModelSpec, train: TrainSpec) -> None:
    """The built-in GPT's layers, heads and vocabulary against the parallel layout (other
    families are checked when the job is loaded, from their config)."""
    if train.pipeline_stages > model.layers:
        raise ValueError(
            f"train.pipeline_stages: {train.pipeline_stages} is more than model.layers "
            f"{model.layers}; every stage needs at least one layer. To fix: use at most "
            f"{model.layers} stages."
        )
    tp = train.tensor_parallel
    for field_name, value in (("heads", model.heads), ("vocabulary_size", model.vocabulary_size)):
        if value % tp:
            raise ValueError(
                f"train.tensor_parallel: {tp} does not divide model.{field_name} {value}; "
                f"each rank holds an equal share of it. To fix: use a tensor_parallel from "
                f"{divisors(value)}, or change model.{field_name}."
            )


def _is_s3_bucket(uri: str) -> bool:
    return uri.startswith("s3://") and bool(uri.removeprefix("s3://").split("/")[0])


def _check_sweep_cadence(sweep: SweepSpec, train: TrainSpec) -> None:
    """Tune sees a trial's metric only at report steps; schedulers need it with checkpoints."""
    if sweep.metric == "val_loss" and train.checkpoint_every % train.eval_every:
        raise ValueError(
            f"train.checkpoint_every: {train.checkpoint_every} is not a multiple of "
            f"train.eval_every {train.eval_every}, so some checkpoints of a sweep trial would "
            "have no sweep.metric val_loss to rank them by. To fix: make checkpoint_every a "
            "multiple of eval_every."
        )
    if sweep.metric == "loss" and train.checkpoint_every % train.log_every:
        raise ValueError(
            f"train.checkpoint_every: {train.checkpoint_every} is not a multiple of "
            f"train.log_every {train.log_every}, so some checkpoints of a sweep trial would "
            "have no sweep.metric loss. To fix: make checkpoint_every a multiple of log_every."
        )
    interval = sweep.pbt_settings.perturbation_interval
    if sweep.scheduler == "pbt" and interval % train.checkpoint_every:
        raise ValueError(
            f"sweep.pbt.perturbation_interval: {interval} is not a multiple of "
            f"train.checkpoint_every {train.checkpoint_every}; a trial that exploits another "
            "would start from a stale checkpoint. To fix: make the interval a multiple of "
            "checkpoint_every."
        )
    if sweep.scheduler == "asha" and sweep.asha_settings.grace_period > train.max_steps:
        raise ValueError(
            f"sweep.asha.grace_period: {sweep.asha_settings.grace_period} is longer than "
            f"train.max_steps {train.max_steps}, so no trial could be stopped early. To fix: "
            f"use a grace period below {train.max_steps} steps."
        )
