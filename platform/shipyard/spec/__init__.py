"""Typed job specs loaded from YAML with errors that name the file and the field."""

from shipyard.spec.job import DataSpec, FailureSpec, JobSpec, ModelSpec, ServeSpec, TrainSpec
from shipyard.spec.load import load_job, read_yaml, validate

__all__ = [
    "DataSpec",
    "FailureSpec",
    "JobSpec",
    "ModelSpec",
    "ServeSpec",
    "TrainSpec",
    "load_job",
    "read_yaml",
    "validate",
]
