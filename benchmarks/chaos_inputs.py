"""The malformed-input corpus of `chaos.py`: job specs, cluster YAMLs, corpora, HTTP bodies and
artifact manifests, each the way a careless user or an attacker would write it.

Every case is run the way a user meets it (`shipyard plan` in a fresh process for files, the
corpus pipeline on Ray Data, HTTP to the served model, a pull from a store) and judged:
`clean` (Shipyard's own error, naming what is wrong), `traceback` (anything else: a Python
traceback, a 5xx, a hang) or `accepted` (valid after all: a miss when the case expected a
refusal). Files that appear outside the case's own folder are counted too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SHIPYARD = [sys.executable, "-m", "shipyard"]
GOOD_JOB = {"name": "probe", "model": {"layers": 2, "heads": 2, "width": 32}}
GOOD_CLUSTER = {
    "cluster_name": "chaos",
    "provider": {"type": "local", "head_ip": "127.0.0.1"},
    "head_node_type": "head",
    "available_node_types": {"head": {"resources": {"CPU": 2}, "max_workers": 0}},
}


@dataclass
class Outcome:
    kind: str  # job spec, cluster YAML, corpus, HTTP body, manifest
    case: str
    verdict: str  # clean, traceback, accepted
    detail: str
    outside: list[str]


def job_text(**changes: Any) -> str:
    return yaml.safe_dump({**GOOD_JOB, **changes})


def job_spec_cases() -> dict[str, bytes | str]:
    """Job specs that `shipyard plan` must refuse, each with a clean error."""
    model = GOOD_JOB["model"]
    return {
        "not UTF-8": b"name: caf\xe9\n",
        "binary": bytes(range(256)),
        "empty": "",
        "a list": "- name: x\n",
        "a scalar": "just words\n",
        "bad YAML": "name: [unclosed\n",
        "tab indentation": "name: x\nmodel:\n\tlayers: 2\n",
        "key written twice": "name: x\nname: y\n",
        "nested key twice": "name: x\ntrain:\n  lr: 0.1\n  lr: 0.2\n",
        "unknown field": job_text(modle={"layers": 2}),
        "typo in train": job_text(train={"learning_rate": 0.1}),
        "lr a word": job_text(train={"lr": "fast"}),
        "negative lr": job_text(train={"lr": -1}),
        "zero micro-batch": job_text(train={"micro_batch_size": 0}),
        "name with a slash": job_text(name="../../etc/x"),
        "name too long": job_text(name="n" * 101),
        "name of a sweep folder": job_text(name="probe-sweep"),
        "storage over http": job_text(storage="http://example.com/runs"),
        "data source missing": job_text(data={"source": "no/such/corpus.jsonl"}),
        "data glob matching nothing": job_text(data={"source": "nothing/*.parquet"}),
        "tokenizer folder missing": job_text(tokenizer={"path": "no/such/tokenizer"}),
        "unknown model type": job_text(model={**model, "type": "rnn"}),
        "zero layers": job_text(model={**model, "layers": 0}),
        "heads not dividing width": job_text(model={**model, "heads": 3}),
        "more stages than layers": job_text(train={"pipeline_stages": 4}),
        "tensor parallel not dividing heads": job_text(train={"tensor_parallel": 3}),
        "unknown precision": job_text(train={"precision": "fp8"}),
        "port out of range": job_text(serve={"port": 70000}),
        "chat template not Jinja": job_text(serve={"chat_template": "{% for %}"}),
        "unknown architecture": job_text(
            model={"type": "huggingface", "architecture": "nonesuch", "config": {}}
        ),
        "pretrained folder missing": job_text(
            model={"type": "huggingface", "path": "no/such/model"}
        ),
        "sweep of an unknown field": job_text(
            sweep={"space": {"train.lrr": {"choice": [0.1]}}},
            train={"eval_every": 10, "checkpoint_every": 10, "max_steps": 20},
        ),
        "sweep name too long": job_text(
            name="s" * 97,
            sweep={"space": {"train.lr": {"choice": [0.1]}}},
            train={"eval_every": 10, "checkpoint_every": 10, "max_steps": 20},
        ),
        "alias bomb": _alias_bomb(),
    }


def _alias_bomb() -> str:
    """A 'billion laughs' document: aliases that expand to 10^7 strings if walked."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 8):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append("name: *a7")
    return "\n".join(lines) + "\n"


def cluster_cases() -> dict[str, bytes | str]:
    """Cluster YAMLs that `shipyard plan --cluster` must refuse."""
    head = GOOD_CLUSTER["available_node_types"]["head"]

    def cluster(**changes: Any) -> str:
        return yaml.safe_dump({**GOOD_CLUSTER, **changes})

    def node_types(**worker: Any) -> str:
        return cluster(available_node_types={"head": head, "worker": worker})

    return {
        "not UTF-8": b"cluster_name: caf\xe9\n",
        "a list": "- x\n",
        "no provider": yaml.safe_dump({k: v for k, v in GOOD_CLUSTER.items() if k != "provider"}),
        "unknown provider": cluster(provider={"type": "nowhere"}),
        "head type missing": cluster(head_node_type="boss"),
        "negative max_workers": node_types(resources={"CPU": 2}, max_workers=-1),
        "min over max": node_types(resources={"CPU": 2}, min_workers=3, max_workers=1),
        "negative CPUs": node_types(resources={"CPU": -2}, max_workers=1),
        "cluster name a path": cluster(cluster_name="../../outside"),
        "cluster name too long": cluster(cluster_name="c" * 200),
        "key written twice": "cluster_name: a\ncluster_name: b\n",
        "resources a word": node_types(resources="lots", max_workers=1),
    }


def run_plan_case(case_folder: Path, job: bytes | str, cluster: bytes | str | None) -> tuple:
    """`shipyard plan` on the case's files, in a fresh process, from the case's folder."""
    case_folder.mkdir(parents=True)
    job_file = case_folder / "job.yaml"
    _write(job_file, job)
    command = [*SHIPYARD, "plan", str(job_file)]
    if cluster is not None:
        cluster_file = case_folder / "cluster.yaml"
        _write(cluster_file, cluster)
        command += ["--cluster", str(cluster_file)]
        named = cluster_file
    else:
        named = job_file
    environment = {**os.environ, "SHIPYARD_CACHE": str(case_folder / "cache")}
    try:
        answer = subprocess.run(
            command, cwd=case_folder, env=environment, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "traceback", "no answer in 120 s"
    return _judge_cli(answer, named)


def _judge_cli(answer: subprocess.CompletedProcess, named: Path) -> tuple[str, str]:
    error = " ".join(answer.stderr.split())
    if answer.returncode == 0:
        return "accepted", "exit 0"
    if answer.returncode == 2 and "Traceback" not in answer.stderr and str(named) in error:
        return "clean", error[error.find("error:") :][:160]
    return "traceback", f"exit {answer.returncode}: {answer.stderr.strip().splitlines()[-1:]}"


def _write(path: Path, content: bytes | str) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def corpus_cases() -> dict[str, Callable[[Path], dict[str, Any]]]:
    """Corpora that the pipeline must refuse, naming the file (and line or row): each makes
    its files in a folder and gives the job's data (and tokenizer) sections."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def jsonl(lines: list[str], **data: Any):
        def make(folder: Path) -> dict[str, Any]:
            (folder / "c.jsonl").write_text("\n".join(lines) + "\n")
            return {"data": {"source": str(folder / "c.jsonl"), **data}}

        return make

    def parquet(table: dict[str, list], **data: Any):
        def make(folder: Path) -> dict[str, Any]:
            pq.write_table(pa.table(table), folder / "c.parquet")
            return {"data": {"source": str(folder / "c.parquet"), **data}}

        return make

    def text(content: bytes):
        def make(folder: Path) -> dict[str, Any]:
            (folder / "c.txt").write_bytes(content)
            return {"data": {"source": str(folder / "c.txt")}}

        return make

    def no_tokenizer_json(folder: Path) -> dict[str, Any]:
        (folder / "tok").mkdir()
        (folder / "tok" / "tokenizer_config.json").write_text("{}")
        (folder / "c.txt").write_text("some text\n" * 1000)
        return {
            "data": {"source": str(folder / "c.txt")},
            "tokenizer": {"path": str(folder / "tok")},
        }

    def empty_folder(folder: Path) -> dict[str, Any]:
        (folder / "corpus").mkdir()
        return {"data": {"source": str(folder / "corpus")}}

    def unknown_extensions(folder: Path) -> dict[str, Any]:
        (folder / "corpus").mkdir()
        (folder / "corpus" / "a.docx").write_bytes(b"PK\x03\x04")
        return {"data": {"source": str(folder / "corpus")}}

    document = "def f(x):\n    return x + 1\n" * 40
    return {
        "empty JSONL": jsonl([""]),
        "JSONL line not JSON": jsonl([json.dumps({"text": document}), "{oops"]),
        "JSONL without the field": jsonl([json.dumps({"body": document})] * 50),
        "JSONL field not text": jsonl([json.dumps({"text": 42})] * 50),
        "Parquet without the column": parquet({"body": [document] * 50}, text_column="text"),
        "Parquet tokens out of range": parquet(
            {"input_ids": [[70000, 1, 2]] * 500}, tokens_field="input_ids"
        ),
        "text not UTF-8": text(b"ok\n" * 100 + b"\xff\xfe bad\n"),
        "too small for one batch": jsonl([json.dumps({"text": "tiny"})]),
        "tokenizer folder without tokenizer.json": no_tokenizer_json,
        "empty folder": empty_folder,
        "only unknown extensions": unknown_extensions,
    }


def http_cases(model: str) -> dict[str, tuple[bytes, int | None]]:
    """Request bodies for /v1/completions with the status class expected: 4 (refused), or 2
    for the valid-but-extreme ones that must be answered."""

    def body(**fields: Any) -> bytes:
        return json.dumps({"model": model, "prompt": "def ", "max_tokens": 4, **fields}).encode()

    deep = b'{"model": "' + model.encode() + b'", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    return {
        "not JSON": (b"{not json", 4),
        "JSON array": (b"[1, 2, 3]", 4),
        "empty body": (b"", 4),
        "prompt a number": (body(prompt=42), 4),
        "negative max_tokens": (body(max_tokens=-1), 4),
        "huge n": (body(n=10**9), 4),
        "token ids out of vocabulary": (body(prompt=[10**9, -5]), 4),
        "nesting 5000 deep": (deep, 4),
        "lone surrogate": (b'{"model": "' + model.encode() + b'", "prompt": "\\ud800"}', 4),
        "100 stop strings": (body(stop=["x"] * 100), 4),
        "seed past 2^63": (body(seed=2**64), 4),
        "unknown field": (body(best_offer=1), 4),
        "chat without messages": (json.dumps({"model": model, "messages": []}).encode(), 4),
        "temperature 1e-40": (body(temperature=1e-40), 2),
        "top_p just above 0": (body(top_p=1e-30), 2),
        "2 MB body": (body(prompt="x" * 2_000_000), 4),
    }


def manifest_cases(version: str) -> dict[str, tuple[str, str]]:
    """(key, text) written over a published version's files in the store."""
    manifest = f"probe/{version}/manifest.json"

    def files(**entries: Any) -> str:
        return json.dumps({"name": "probe", "version": version, "files": entries, "metadata": {}})

    sha = {"bytes": 1, "sha256": "0" * 64}
    return {
        "absolute path": (manifest, files(**{"/tmp/shipyard-chaos-escaped": sha})),
        "dot-dot path": (manifest, files(**{"../../escaped": sha})),
        "empty segment": (manifest, files(**{"a//escaped": sha})),
        "backslash": (manifest, files(**{"..\\escaped": sha})),
        "not JSON": (manifest, "{broken"),
        "files not a mapping": (
            manifest,
            json.dumps({"name": "probe", "version": version, "files": [1], "metadata": {}}),
        ),
        "no sha256": (manifest, files(**{"weights.bin": {"bytes": 1}})),
        "latest to a parent": ("probe/latest", json.dumps({"version": "../.."})),
        "latest not JSON": ("probe/latest", "]"),
        "latest to nothing": ("probe/latest", json.dumps({"version": "20990101T000000Z-ffffff"})),
    }
