"""A `huggingface` model spec resolved to a transformers config, and its weights folder checked.

Everything here runs before Ray starts and raises ValueError naming the spec field: an unknown
architecture (with did-you-mean), a config field the architecture does not have, a folder
without config.json, pickled weights (.bin/.pt), a missing shard, code the folder asks to run.
Nothing is downloaded from a hub: `path` is a folder, or an s3:// prefix copied once into
Shipyard's cache.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.spec.model import HuggingFaceModelSpec
from shipyard.storage import cache_root, is_remote, open_store, safe_relative

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Resolved:
    """The spec's transformers config, and the folder its weights come from (None: random)."""

    config: Any
    folder: Path | None
    weight_files: tuple[str, ...]  # safetensors files in `folder`, shards in index order


def resolve(spec: HuggingFaceModelSpec) -> Resolved:
    """The transformers config the spec describes and its checked weights folder."""
    from transformers import AutoConfig

    if spec.path is None:
        config_class = config_class_for(spec.architecture or "")
        _check_config_fields(config_class, spec.config, "model.config")
        config = _build(lambda: config_class(**spec.config), "model.config")
        return Resolved(config, None, ())
    folder = local_folder(spec.path)
    saved = _read_config(folder, spec.path)
    model_type = saved.get("model_type", "")
    if spec.architecture and spec.architecture != model_type:
        raise ValueError(
            f"model.architecture: {spec.architecture!r} differs from the model_type "
            f"{model_type!r} in {spec.path}/{CONFIG_FILE}. To fix: remove architecture (the "
            "folder says what it is) or point path at a folder of that architecture."
        )
    config_class = config_class_for(model_type, field=f"{spec.path}/{CONFIG_FILE}: model_type")
    _check_config_fields(config_class, spec.config, "model.config")
    config = _build(
        lambda: AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, **spec.config
        ),
        f"{spec.path}/{CONFIG_FILE}",
    )
    return Resolved(config, folder, weight_files(folder, spec.path))


def config_class_for(architecture: str, field: str = "model.architecture") -> Any:
    """The config class of a transformers causal-LM architecture (its model_type)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if architecture not in known:
        guess = difflib.get_close_matches(architecture, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(g) for g in guess)}?" if guess else ""
        raise ValueError(
            f"{field}: {architecture!r} is not a causal language model architecture of "
            f"transformers.{hint} To fix: use a model_type such as llama, gpt2, mistral or "
            f"qwen2 ({len(known)} are known)."
        )
    return CONFIG_MAPPING[architecture]


def config_fields(config_class: Any) -> list[str]:
    """Every field the architecture's config takes, its aliases (GPT-2's n_embd) included."""
    names = (
        [f.name for f in dataclasses.fields(config_class)]
        if dataclasses.is_dataclass(config_class)
        else []
    )
    return sorted({*names, *getattr(config_class, "attribute_map", {})})


def _check_config_fields(config_class: Any, given: dict[str, Any], where: str) -> None:
    allowed = config_fields(config_class)
    for key in given:
        if key not in allowed:
            guess = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            raise ValueError(
                f"{where}.{key}: {config_class.model_type} has no such config field.{hint} "
                f"To fix: rename or remove it; it allows: {', '.join(allowed)}."
            )
        if key == "auto_map":
            raise ValueError(f"{where}.auto_map: loads code from a repository; not allowed.")


def _build(make, where: str) -> Any:
    from huggingface_hub.errors import StrictDataclassError

    try:
        return make()
    except (TypeError, ValueError, StrictDataclassError) as error:  # transformers' validation
        message = " ".join(str(error).split())
        raise ValueError(f"{where}: {message}") from None


def _read_config(folder: Path, shown: str) -> dict[str, Any]:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise ValueError(
            f"model.path: {shown} has no {CONFIG_FILE}. To fix: point it at a folder written by "
            "save_pretrained (config.json and safetensors weights)."
        )
    try:
        saved = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"model.path: {shown}/{CONFIG_FILE} is not valid JSON ({error})."
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(f"model.path: {shown}/{CONFIG_FILE} is not a JSON object.")
    if saved.get("auto_map"):
        raise ValueError(
            f"model.path: {shown}/{CONFIG_FILE} has auto_map: it needs Python code from the "
            "folder or a hub repository, which Shipyard never runs. To fix: use an "
            "architecture transformers ships, or type: python with your own factory."
        )
    return saved


def weight_files(folder: Path, shown: str) -> tuple[str, ...]:
    """The folder's safetensors weight files; pickled weights are refused, shards checked."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"model.path: {shown}/{SAFETENSORS_INDEX} is not a safetensors index "
                "(a JSON object with a weight_map)."
            ) from None
        files = tuple(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise ValueError(
                f"model.path: {shown} is missing {len(missing)} of the {len(files)} shards "
                f"its {SAFETENSORS_INDEX} lists: {', '.join(missing[:3])}. To fix: copy the "
                "whole folder."
            )
        return files
    if (folder / SAFETENSORS_FILE).is_file():
        return (SAFETENSORS_FILE,)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"model.path: {shown} holds only pickled weights ({', '.join(pickles[:3])}); "
            "loading a pickle runs whatever code it contains, so Shipyard loads safetensors "
            "only. To fix: convert it once where you trust it: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)."
        )
    raise ValueError(
        f"model.path: {shown} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}. To fix: save "
        "the model with save_pretrained (safetensors is its default)."
    )


def local_folder(path: str, field: str = "model.path") -> Path:
    """`path` as a folder on this machine: itself, or an s3:// prefix copied into Shipyard's
    cache (a new copy whenever its objects change)."""
    if not is_remote(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"{field}: {path} is not a folder. To fix: give a folder written by "
                "save_pretrained, or an s3://bucket/prefix holding one."
            )
        return folder.resolve()
    store = open_store(path)
    listing = store.listing("")
    if not listing:
        raise ValueError(f"{field}: {path} holds no objects. To fix: upload the folder there.")
    version = hashlib.sha256(json.dumps(sorted(listing.items())).encode()).hexdigest()[:16]
    name = path.removeprefix("s3://").strip("/").replace("/", "_")
    target = cache_root() / "models" / f"{name}-{version}"
    if not target.is_dir():
        _download(store, sorted(listing), target)
    return target


def _download(store, keys: list[str], target: Path) -> None:
    """Every key into `target`, which appears whole or not at all (ranks racing to fetch the
    same folder each stage their own copy; the first rename wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for key in keys:
            local = staging / safe_relative(key, f"{store.uri}/{key}")
            local.parent.mkdir(parents=True, exist_ok=True)
            store.download(key, local)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
