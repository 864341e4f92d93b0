"""Errors a user can act on: each says what went wrong, where, and how to fix it."""


class ShipyardError(Exception):
    """Base class for errors the CLI prints as one clean paragraph (exit code 2)."""


class SpecError(ShipyardError):
    """A job spec or cluster YAML is invalid: names the file, the field and what is allowed."""


class ResourceError(ShipyardError):
    """The cluster cannot give what the job asks for (raised before anything is launched)."""


class TrainingError(ShipyardError):
    """Training started but failed; carries the worker's error message, not Ray's traceback."""


class PlacementError(ShipyardError):
    """Ray put ranks on other node types than the plan needs (raised in the workers)."""
