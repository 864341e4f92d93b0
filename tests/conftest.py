"""Shared test helpers: writing job specs to temporary files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_job(tmp_path: Path):
    """Write a job spec mapping (or raw YAML text) to a file and return its path."""

    def write(document: dict | str, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
        return path

    return write


@pytest.fixture
def shipped_pretrained(tmp_path, monkeypatch):
    """Run from a folder holding models/tiny-llama, the pretrained folder the shipped fine-tune
    job names, made with save_pretrained (random weights, the tiny Llama job's architecture)."""
    from transformers import AutoModelForCausalLM

    from shipyard.models import model_family
    from shipyard.spec.load import load_job

    config = model_family(load_job(REPO / "jobs" / "tiny-llama.yaml").model).config
    folder = tmp_path / "models" / "tiny-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    return folder


def start_moto_server(log: Path, **environment: str):
    """moto's S3-compatible server on 127.0.0.1 (a real HTTP server boto3 talks to)."""
    import subprocess
    import sys
    import time
    import urllib.request

    from shipyard.runtime.local import free_port

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **environment},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return server, url
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto_server did not start; see {log}") from None
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server per session; yields its endpoint URL."""
    server, url = start_moto_server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield url
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A fresh bucket on the session's S3 server, with this process's AWS settings pointing at
    it; yields the bucket's s3:// URI."""
    import boto3

    for name, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60]
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"
