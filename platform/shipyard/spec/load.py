"""Loading YAML into typed specs, turning every problem into one readable SpecError."""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from shipyard.errors import SpecError
from shipyard.spec.cluster import ClusterSpec, parse_cluster
from shipyard.spec.job import JobSpec
from shipyard.storage import is_remote

Spec = TypeVar("Spec", bound=BaseModel)


def load_job(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate a job spec file; relative storage and artifacts folders resolve
    against the cwd."""
    job = validate(JobSpec, read_yaml(path), source=str(path))
    if job.sweep is not None:
        from shipyard.sweep.search_space import check_sweep  # it builds on this module

        check_sweep(job, str(path))
    resolved = {
        field: str(Path(location).expanduser().resolve())
        for field, location in (("storage", job.storage), ("artifacts", job.artifacts))
        if location and not is_remote(location)
    }
    return job.model_copy(update=resolved)


def load_cluster(path: str | os.PathLike[str]) -> ClusterSpec:
    """Read and validate a Ray cluster-launcher YAML into the cluster the planner sees."""
    return parse_cluster(read_yaml(path, kind="cluster YAML"), str(path))


def read_yaml(path: str | os.PathLike[str], kind: str = "job spec") -> dict[str, Any]:
    """The YAML mapping in `path`, or a SpecError saying why there is none."""
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"{path}: no such file. To fix: give the path of a {kind}.")
    try:
        document = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError(f"{path}: not valid YAML{line}: {problem}.") from None
    if not isinstance(document, dict):
        raise SpecError(
            f"{path}: the top level must be a mapping of fields (a {kind}), "
            f"not {type(document).__name__}."
        )
    return document


def validate(model: type[Spec], document: dict[str, Any], source: str) -> Spec:
    """Validate `document` as `model`; all problems are reported together, one per line."""
    try:
        return model.model_validate(document)
    except ValidationError as error:
        problems = [describe(model, problem) for problem in error.errors()]
        raise SpecError("\n".join(f"{source}: {problem}" for problem in problems)) from None


def describe(model: type[BaseModel], problem: dict[str, Any]) -> str:
    """One pydantic error as 'field: what is wrong. To fix: …'."""
    location = [str(part) for part in problem["loc"]]
    field = ".".join(location)
    kind = problem["type"]
    if kind == "extra_forbidden":
        return _unknown_field(model, location)
    if kind == "missing":
        return f"{field}: is required but missing. To fix: add it."
    if kind == "value_error":
        # Our cross-field rules already name their fields in full.
        return problem["msg"].removeprefix("Value error, ")
    if kind == "literal_error":
        allowed = problem["ctx"]["expected"].replace("'", "")
        return f"{field}: {problem['input']!r} is not allowed ({allowed})."
    return f"{field}: {problem['input']!r} is not valid: {_lowercase_first(problem['msg'])}."


def _unknown_field(model: type[BaseModel], location: list[str]) -> str:
    parent = spec_section(model, location[:-1])
    key = location[-1]
    field = ".".join(location)
    allowed = list(parent.model_fields) if parent else []
    guess = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f" Did you mean '{guess[0]}'?" if guess else ""
    where = ".".join(location[:-1]) or "the top level"
    return (
        f"{field}: unknown field.{hint} To fix: rename or remove it; "
        f"{where} allows: {', '.join(allowed)}."
    )


def spec_section(model: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    """The spec class found by walking `path` down from `model`, if it is one."""
    current: type[BaseModel] = model
    for name in path:
        field = current.model_fields.get(name)
        sections = [_as_section(kind) for kind in _kinds(field.annotation if field else None)]
        found = [section for section in sections if section is not None]
        if not found:
            return None
        current = found[0]
    return current


def _kinds(annotation: Any) -> tuple[Any, ...]:
    """The types an annotation allows: `SweepSpec | None` gives (SweepSpec, NoneType)."""
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


def _as_section(kind: Any) -> type[BaseModel] | None:
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]
