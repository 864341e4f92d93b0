"""Loading YAML into typed specs, turning every problem into one readable SpecError."""

from __future__ import annotations

import difflib
import glob
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from shipyard.errors import SpecError
from shipyard.spec.cluster import ClusterSpec, parse_cluster
from shipyard.spec.data import PYTHON_STDLIB
from shipyard.spec.job import JobSpec
from shipyard.storage import is_remote

Spec = TypeVar("Spec", bound=BaseModel)
MERGE_TAG = "tag:yaml.org,2002:merge"


def load_job(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate a job spec file; relative folders (storage, artifacts, a model's
    path) resolve against the cwd."""
    job = _absolute_paths(validate(JobSpec, read_yaml(path), source=str(path)))
    from shipyard.models import check_model  # the model families build on the spec

    check_model(job, str(path))
    if job.sweep is not None:
        from shipyard.sweep.search_space import check_sweep  # it builds on this module

        check_sweep(job, str(path))
    return job


def check_data_source(job: JobSpec, source: str) -> None:
    """A data.source on this machine's disk must be there, refused now rather than once Ray
    has started. Nothing is listed or read: a built-in corpus and an s3:// prefix are checked
    when the corpus is prepared. Not part of load_job: serve, export and submit (which runs on
    the cluster's head) need no corpus here."""
    location = job.data.source
    if location == PYTHON_STDLIB or is_remote(location) or _on_this_machine(location):
        return
    looked_at = Path(location).expanduser().absolute()
    raise SpecError(
        f"{source}: data.source: {location!r} is not on this machine: no file, folder or glob "
        f"match at {looked_at}. To fix: give the path of a file or folder of text, JSONL or "
        f"Parquet, a glob such as 'corpus/*.jsonl', {PYTHON_STDLIB!r} or an s3://bucket/prefix."
    )


def _on_this_machine(location: str) -> bool:
    """Whether a local data.source is a file, a folder or a glob matching a file, resolved
    against the cwd as the corpus reader does; stops at the first match."""
    path = Path(location).expanduser()
    if path.is_file() or path.is_dir():
        return True
    return any(Path(match).is_file() for match in glob.iglob(str(path), recursive=True))


def _absolute_paths(job: JobSpec) -> JobSpec:
    resolved: dict[str, Any] = {
        field: str(Path(location).expanduser().resolve())
        for field, location in (("storage", job.storage), ("artifacts", job.artifacts))
        if location and not is_remote(location)
    }
    model_path = getattr(job.model, "path", None)
    if model_path and not is_remote(model_path):
        absolute = str(Path(model_path).expanduser().resolve())
        resolved["model"] = job.model.model_copy(update={"path": absolute})
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
        document = yaml.load(_utf8_text(path, kind), Loader=UniqueKeyLoader)
    except RepeatedKeyError as error:
        raise SpecError(f"{path}: {error.problem}") from None
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


def _utf8_text(path: str | os.PathLike[str], kind: str) -> str:
    """The file's text; a binary file or another encoding is refused at its first bad byte."""
    content = Path(path).read_bytes()
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        raise SpecError(
            f"{path}: not UTF-8 text: byte {error.start} (line {line}) is "
            f"{content[error.start]:#04x}. To fix: give a {kind} saved as UTF-8."
        ) from None


class RepeatedKeyError(yaml.constructor.ConstructorError):
    """A key written twice in one mapping; its problem names the key and both lines."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key written twice in one mapping, of which YAML
    would silently keep the last. A key that a merge (`<<:`) brings may be written again: that
    overrides it, which is what merge keys are for. Otherwise it loads what safe_load does
    (and Ray, reading a cluster YAML)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._flattened: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Flattening adds the merged keys to node.value, and a mapping merged into others is
        # flattened again there: its own keys are taken before, and checked the first time.
        first_time = id(node) not in self._flattened
        self._flattened.add(id(node))
        written = [key for key, _ in node.value if key.tag != MERGE_TAG]
        super().flatten_mapping(node)
        if first_time:
            self._refuse_repeated(written)

    def _refuse_repeated(self, keys: list[yaml.Node]) -> None:
        seen: dict[Any, yaml.Node] = {}
        for key_node in keys:
            key = self.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key, which the constructor refuses itself
                continue
            if first is not key_node:
                raise RepeatedKeyError(
                    problem=f"{key}: written twice in one mapping "
                    f"({_lines(first, key_node)}); only the last would count. "
                    "To fix: keep one of them.",
                    problem_mark=key_node.start_mark,
                )


def _lines(first: yaml.Node, second: yaml.Node) -> str:
    one, other = first.start_mark.line + 1, second.start_mark.line + 1
    return f"both on line {one}" if one == other else f"lines {one} and {other}"


def validate(model: type[Spec], document: dict[str, Any], source: str) -> Spec:
    """Validate `document` as `model`; all problems are reported together, one per line."""
    try:
        return model.model_validate(document)
    except ValidationError as error:
        problems = [describe(model, problem) for problem in error.errors()]
        raise SpecError("\n".join(f"{source}: {problem}" for problem in problems)) from None


def describe(model: type[BaseModel], problem: dict[str, Any]) -> str:
    """One pydantic error as 'field: what is wrong. To fix: …'."""
    location, sections = _walk(model, [str(part) for part in problem["loc"]])
    field = ".".join(location)
    kind = problem["type"]
    if kind == "extra_forbidden":
        return _unknown_field(sections[-2] if len(sections) > 1 else None, location)
    if kind == "missing":
        return f"{field}: is required but missing. To fix: add it."
    if kind == "value_error":
        # Our cross-field rules already name their fields in full.
        return problem["msg"].removeprefix("Value error, ")
    if kind == "literal_error":
        allowed = problem["ctx"]["expected"].replace("'", "")
        return f"{field}: {problem['input']!r} is not allowed ({allowed})."
    if kind == "union_tag_invalid":
        tag, allowed = problem["ctx"]["tag"], problem["ctx"]["expected_tags"].replace("'", "")
        guess = difflib.get_close_matches(str(tag), allowed.split(", "), n=1, cutoff=0.6)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        return f"{field}.type: {tag!r} is not allowed ({allowed}).{hint}"
    return f"{field}: {problem['input']!r} is not valid: {_lowercase_first(problem['msg'])}."


def _walk(model: type[BaseModel], location: list[str]) -> tuple[list[str], list[Any]]:
    """The location without the tags pydantic adds inside a tagged union (`model.huggingface.
    config` is the user's `model.config`), and the spec class (or None) at each step."""
    path: list[str] = []
    sections: list[Any] = [model]
    index = 0
    while index < len(location):
        name = location[index]
        current = sections[-1]
        field = current.model_fields.get(name) if current is not None else None
        members = _sections(field.annotation) if field else []
        path.append(name)
        tagged = {_tag(member): member for member in members}
        if len(members) > 1 and index + 1 < len(location) and location[index + 1] in tagged:
            sections.append(tagged[location[index + 1]])
            index += 2
            continue
        sections.append(members[0] if members else None)
        index += 1
    return path, sections


def _unknown_field(parent: type[BaseModel] | None, location: list[str]) -> str:
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


def spec_section(
    model: type[BaseModel], path: list[str], instance: BaseModel | None = None
) -> type[BaseModel] | None:
    """The spec class found by walking `path` down from `model`, if it is one. Where a field
    may hold one of several sections (`model:`), `instance` says which one it holds."""
    current: type[BaseModel] = model
    for name in path:
        field = current.model_fields.get(name)
        found = _sections(field.annotation) if field else []
        if instance is not None and len(found) > 1:
            found = [type(getattr(instance, name))]
        if not found:
            return None
        current = found[0]
        instance = getattr(instance, name, None) if instance is not None else None
    return current


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The spec sections a field's annotation allows: `SweepSpec | None` gives [SweepSpec]."""
    kinds = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return [kind for kind in kinds if isinstance(kind, type) and issubclass(kind, BaseModel)]


def _is_union(annotation: Any) -> bool:
    return isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union


def _tag(section: type[BaseModel]) -> str | None:
    field = section.model_fields.get("type")
    values = typing.get_args(field.annotation) if field else ()
    return str(values[0]) if values else None


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]
