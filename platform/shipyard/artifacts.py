"""What a trained job publishes and how it comes back: model export, metrics, spec and plan.

A push takes the job's latest checkpoint, exports its consolidated weights (as `shipyard serve`
does) and publishes them with the spec and plan that trained them, its metrics and the Shipyard
version, so the run can be reproduced and served anywhere. Where: the job's `artifacts:` (a
folder or s3://bucket/prefix), or the location given on the command line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from shipyard import __version__
from shipyard.errors import ShipyardError
from shipyard.spec.job import JobSpec
from shipyard.storage import Manifest, Store, latest, open_store, publish, pull, versions

EXPORT = "export"  # the folder of a published version holding the served model
METRICS_FILE = "metrics.jsonl"


class ArtifactError(ShipyardError):
    """Nothing to push, nowhere to push to, or no such published version."""


def artifact_store(job: JobSpec, location: str | None) -> Store:
    """The store named on the command line, else the job's `artifacts:`."""
    uri = location or job.artifacts
    if not uri:
        raise ArtifactError(
            f"job {job.name!r} has no artifacts: location. To fix: add `artifacts: "
            "s3://bucket/prefix` (or a folder) to the job, or pass --to / --from."
        )
    return open_store(uri)


def push(job: JobSpec, store: Store) -> Manifest:
    """Publish the job's latest checkpoint as a new version of `job.name`."""
    from shipyard.serve.export import export_checkpoint
    from shipyard.train.checkpoint import latest_checkpoint, local_copy, run_folder

    saved = latest_checkpoint(job.storage, job.name)
    if saved is None:
        raise ArtifactError(
            f"job {job.name!r} has no checkpoint under {job.storage} to push. To fix: train it "
            "first (shipyard train)."
        )
    run = run_folder(job.storage, job.name)
    export = export_checkpoint(local_copy(saved, run))
    with tempfile.TemporaryDirectory(prefix="shipyard-push-") as folder:
        staging = Path(folder)
        shutil.copytree(export.folder, staging / EXPORT)
        metrics = run / METRICS_FILE
        if metrics.is_file():
            shutil.copyfile(metrics, staging / METRICS_FILE)
        (staging / "job.yaml").write_text(yaml.safe_dump(saved.job, sort_keys=False))
        (staging / "plan.json").write_text(json.dumps(saved.plan, indent=2))
        facts = {
            "step": saved.step,
            "metrics": saved.metrics,
            "weights_sha256": export.sha256,
            "shipyard_version": __version__,
        }
        published = publish(store, job.name, staging, facts)
    tag_run(job, {"shipyard.artifact": f"{store.uri}/{job.name}/{published.version}"})
    return published


def tag_run(job: JobSpec, tags: dict[str, str]) -> None:
    """Tag the job's MLflow run, when it has one (publishing must not fail on tracking)."""
    from shipyard.tracking.setup import tag_recorded_run

    tag_recorded_run(job, tags)


def export_to(job: JobSpec, target: Path, checkpoint: str | None = None) -> Path:
    """The job's latest checkpoint (or `checkpoint`, a folder or s3://…) as a Hugging Face
    folder at `target`, which must not exist yet; it appears whole or not at all."""
    from shipyard.serve.export import export_checkpoint
    from shipyard.train.checkpoint import latest_checkpoint, local_copy, read_checkpoint, run_folder

    if target.exists():
        raise ArtifactError(
            f"--to {target}: already exists; it is left as it is. To fix: give a new folder."
        )
    if checkpoint is None:
        saved = latest_checkpoint(job.storage, job.name)
        if saved is None:
            raise ArtifactError(
                f"job {job.name!r} has no checkpoint under {job.storage} to export. To fix: "
                "train it first (shipyard train)."
            )
    else:
        try:
            saved = read_checkpoint(checkpoint)
        except FileNotFoundError:
            raise ArtifactError(
                f"--checkpoint {checkpoint}: not a Shipyard checkpoint (no shipyard.json)."
            ) from None
    export = export_checkpoint(local_copy(saved, run_folder(job.storage, job.name)))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(export.folder, staging, dirs_exist_ok=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fetch(store: Store, name: str, destination: Path, version: str | None = None) -> Path:
    """Pull `version` of `name` (default: latest) into `destination/<version>`, verified; a
    version pulled before is reused, never overwritten."""
    manifest = _find(store, name, version)
    target = destination / manifest.version
    if target.exists():
        return target
    return pull(store, manifest, destination)


def _find(store: Store, name: str, version: str | None) -> Manifest:
    if version is None:
        found = latest(store, name)
        if found is None:
            raise ArtifactError(f"{store.uri}: nothing published for {name!r} yet.")
        return found
    for manifest in versions(store, name):
        if manifest.version == version:
            return manifest
    raise ArtifactError(
        f"{store.uri}: {name!r} has no version {version!r}. To see them: shipyard artifacts list"
    )
