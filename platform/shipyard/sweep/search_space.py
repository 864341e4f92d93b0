"""A sweep's search space: job-spec fields by dotted path, each with a distribution.

    train.lr: {loguniform: [1.0e-4, 3.0e-3]}
    model.layers: {choice: [2, 4]}
    train.zero_stage: {grid: [1, 2]}

Every path must name a field of the job spec, and every value a distribution can produce must
make a valid job: both are checked here, before Ray starts, with the same errors as the spec.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

from shipyard.errors import SpecError
from shipyard.spec.job import JobSpec
from shipyard.spec.load import spec_section, validate
from shipyard.train.checkpoint import shapes_state

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
_RANGES = ("uniform", "loguniform", "randint")
_FINITE = ("choice", "grid")
_NOT_SEARCHABLE = ("name", "storage", "sweep", "serve")


@dataclass(frozen=True)
class Dimension:
    """One searched field: its dotted path, its distribution and the distribution's arguments."""

    path: str
    distribution: str
    values: tuple[Any, ...]  # (low, high) for ranges; the options for choice and grid

    def to_tune(self) -> Any:
        """The Ray Tune domain for this dimension (randint's high is inclusive here)."""
        from ray import tune

        if self.distribution == "uniform":
            return tune.uniform(*self.values)
        if self.distribution == "loguniform":
            return tune.loguniform(*self.values)
        if self.distribution == "randint":
            low, high = self.values
            return tune.randint(low, high + 1)
        if self.distribution == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def to_mutation(self) -> Any:
        """What PBT resamples from: the domain for ranges, the list of options otherwise."""
        if self.distribution in _RANGES:
            return self.to_tune()
        return list(self.values)

    def extremes(self) -> list[Any]:
        """Values to validate against the spec: every option, or a range's two bounds (a rule
        such as heads dividing width is only checked at the bounds of a range)."""
        return list(self.values)


# The sweep's best trial becomes a job of its own, named after the sweep's (job names: <= 100).
BEST_SUFFIX = "-best"
SWEEP_NAME_MAX = 100 - len(BEST_SUFFIX)


def check_sweep(job: JobSpec, source: str) -> tuple[Dimension, ...]:
    """The job's search space, checked against the job and against the sweep's scheduler."""
    assert job.sweep is not None
    sweep = job.sweep
    if len(job.name) > SWEEP_NAME_MAX:
        raise SpecError(
            f"{source}: name: {len(job.name)} characters; a sweep's job name may have at most "
            f"{SWEEP_NAME_MAX}, as the best trial is written as the job `<name>{BEST_SUFFIX}` "
            "(at most 100). To fix: shorten the name."
        )
    dimensions = parse_search_space(sweep.space, job, source)
    for dimension in dimensions:
        where = f"{source}: sweep.space.{dimension.path}"
        if dimension.path.split(".")[0] in _NOT_SEARCHABLE:
            raise SpecError(
                f"{where}: {', '.join(_NOT_SEARCHABLE)} name the sweep itself and cannot be "
                "searched. To fix: search fields of model, data, train or failure."
            )
        if sweep.search == "optuna" and dimension.distribution == "grid":
            raise SpecError(
                f"{where}: grid cannot be searched by optuna, which samples. To fix: use "
                "choice, or search: random."
            )
        if sweep.scheduler != "fifo" and dimension.path == "train.max_steps":
            raise SpecError(
                f"{where}: the {sweep.scheduler} scheduler decides how long trials train, up to "
                "train.max_steps. To fix: set train.max_steps and leave it out of the space."
            )
        if sweep.scheduler == "pbt" and shapes_state(dimension.path):
            raise SpecError(
                f"{where}: pbt copies checkpoints between trials, and this field changes the "
                "checkpoint's shapes or sharding. To fix: search it with scheduler fifo or "
                "asha, or fix it in the job and search training hyperparameters such as "
                "train.lr."
            )
        if shapes_corpus(dimension.path) and dimension.distribution not in _FINITE:
            raise SpecError(
                f"{where}: the corpus is built once per value before trials start, so this "
                f"field takes choice or grid, not {dimension.distribution}."
            )
    return dimensions


def shapes_corpus(path: str) -> bool:
    """Whether the field changes the tokens a trial trains on (the sequence length only cuts
    the same tokens into other windows)."""
    return path.startswith(("data.", "tokenizer."))


def parse_search_space(space: Any, base: JobSpec, source: str) -> tuple[Dimension, ...]:
    """Check a `sweep.space` mapping against the job spec; the dimensions, in the given order."""
    if not isinstance(space, dict) or not space:
        raise SpecError(
            f"{source}: sweep.space: must be a mapping of dotted field paths to distributions, "
            "e.g. {train.lr: {loguniform: [1.0e-4, 3.0e-3]}}."
        )
    dimensions = tuple(_dimension(path, entry, source) for path, entry in space.items())
    from shipyard.models import check_model

    for dimension in dimensions:
        _check_path(dimension.path, base, source)
        for value in dimension.extremes():
            where = f"{source}: sweep.space.{dimension.path}"
            check_model(apply_overrides(base, {dimension.path: value}, where), where)
    return dimensions


def apply_overrides(base: JobSpec, overrides: dict[str, Any], source: str) -> JobSpec:
    """`base` with each dotted path set to its value, validated as a whole job."""
    document = base.model_dump(mode="json")
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        section = document
        for name in parents:
            section = section[name]
        section[leaf] = value
    return validate(JobSpec, document, source=source)


def _dimension(path: Any, entry: Any, source: str) -> Dimension:
    where = f"{source}: sweep.space.{path}"
    if not isinstance(entry, dict) or len(entry) != 1:
        raise SpecError(
            f"{where}: must be one distribution, such as {{choice: [2, 4]}}; allowed: "
            f"{', '.join(DISTRIBUTIONS)}."
        )
    ((distribution, values),) = entry.items()
    if distribution not in DISTRIBUTIONS:
        raise SpecError(
            f"{where}: {distribution!r} is not a distribution ({', '.join(DISTRIBUTIONS)})."
        )
    if not isinstance(values, list) or not values:
        raise SpecError(f"{where}: {distribution} needs a non-empty list of values.")
    if distribution in _RANGES:
        _check_range(distribution, values, where)
    return Dimension(str(path), distribution, tuple(values))


def _check_range(distribution: str, values: list[Any], where: str) -> None:
    number = int if distribution == "randint" else (int, float)
    if (
        len(values) != 2
        or not all(isinstance(v, number) and not isinstance(v, bool) for v in values)
        or not values[0] < values[1]
        or (distribution == "loguniform" and values[0] <= 0)
    ):
        kind = "integers" if distribution == "randint" else "numbers"
        positive = ", low > 0" if distribution == "loguniform" else ""
        raise SpecError(
            f"{where}: {distribution} takes [low, high] {kind} with low < high{positive}; "
            f"got {values}."
        )
    if distribution != "randint" and not all(math.isfinite(v) for v in values):
        raise SpecError(f"{where}: {distribution} bounds must be finite; got {values}.")


def _check_path(path: str, base: JobSpec, source: str) -> None:
    """Every dotted segment must name a field; a section (model, train, …) is not a leaf. A
    mapping field (a Hugging Face model's config, a factory's options) takes any key: the job
    with each value is checked as a whole."""
    parts = path.split(".")
    for depth, name in enumerate(parts):
        section = spec_section(JobSpec, parts[:depth], base)
        if section is None:
            parent = _field_value(base, parts[: depth - 1])
            if isinstance(parent, dict) or isinstance(
                getattr(parent, parts[depth - 1], None), dict
            ):
                return
            raise SpecError(
                f"{source}: sweep.space.{path}: {parts[depth - 1]} is a field, not a section."
            )
        fields = section.model_fields
        if name not in fields:
            known = ".".join(parts[:depth]) or "the job spec"
            guess = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" Did you mean '{'.'.join([*parts[:depth], guess[0]])}'?" if guess else ""
            raise SpecError(
                f"{source}: sweep.space.{path}: {known} has no field {name!r}.{hint} "
                f"Allowed: {', '.join(fields)}."
            )
    leaf_section = spec_section(JobSpec, parts, base)
    if leaf_section is not None:
        raise SpecError(
            f"{source}: sweep.space.{path}: is a section, not a field. To fix: search one of "
            f"its fields, e.g. {path}.{next(iter(leaf_section.model_fields))}."
        )


def _field_value(job: JobSpec, parts: list[str]) -> Any:
    value: Any = job
    for name in parts:
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value
