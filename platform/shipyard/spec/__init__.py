"""Typed job specs loaded from YAML with errors that name the file and the field."""

from shipyard.spec.cluster import ClusterSpec, NodeType
from shipyard.spec.job import DataSpec, FailureSpec, JobSpec, ServeSpec, TrainSpec
from shipyard.spec.load import load_cluster, load_job, read_yaml, validate
from shipyard.spec.model import GptModelSpec, HuggingFaceModelSpec, ModelSpec, PythonModelSpec

__all__ = [
    "ClusterSpec",
    "DataSpec",
    "FailureSpec",
    "GptModelSpec",
    "HuggingFaceModelSpec",
    "JobSpec",
    "ModelSpec",
    "NodeType",
    "PythonModelSpec",
    "ServeSpec",
    "TrainSpec",
    "load_cluster",
    "load_job",
    "read_yaml",
    "validate",
]
