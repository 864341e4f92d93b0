"""Shared test helpers: writing job specs to temporary files."""

from __future__ import annotations

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
