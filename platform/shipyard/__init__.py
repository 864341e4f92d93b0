"""Shipyard: train, sweep and serve large models on Ray clusters with DeepSpeed.

Importing shipyard starts nothing: Ray is started by the command that needs it.
"""

from shipyard.errors import ResourceError, ShipyardError, SpecError, TrainingError
from shipyard.spec import JobSpec, load_job

__all__ = [
    "JobSpec",
    "ResourceError",
    "ShipyardError",
    "SpecError",
    "TrainingError",
    "load_job",
]
__version__ = "0.1.0"
