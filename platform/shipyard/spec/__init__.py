"""Typed job specs loaded from YAML with errors that name the file and the field."""

from shipyard.spec.cluster import ClusterSpec, NodeType
from shipyard.spec.job import DataSpec, FailureSpec, JobSpec, ModelSpec, ServeSpec, TrainSpec
from shipyard.spec.load import load_cluster, load_job, read_yaml, validate

__all__ = [
    "ClusterSpec",
    "DataSpec",
    "FailureSpec",
    "JobSpec",
    "ModelSpec",
    "NodeType",
    "ServeSpec",
    "TrainSpec",
    "load_cluster",
    "load_job",
    "read_yaml",
    "validate",
]
