"""What several commands share."""

from __future__ import annotations


def usable_stores(job):
    """Check the job's S3 storage and its artifacts location can be used; the latter's store."""
    from shipyard.storage import is_remote, open_store

    if is_remote(job.storage):
        open_store(job.storage).check()
    if not job.artifacts:
        return None
    store = open_store(job.artifacts)
    store.check()
    return store
