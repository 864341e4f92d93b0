"""Driver side of serving: pick the checkpoint, export it, write the Serve config, deploy.

Deciding (which checkpoint, which options) is plain functions of the job spec; only `deploy`,
`serve_status` and `undeploy` talk to Ray.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shipyard.errors import ShipyardError
from shipyard.serve.app import DEPLOYMENT_NAME, build_app, deployment_options
from shipyard.serve.export import MANIFEST_FILE, ExportedModel, export_checkpoint, read_export
from shipyard.spec.job import JobSpec, ServeSpec
from shipyard.storage import is_remote, open_store
from shipyard.train.checkpoint import (
    METADATA_FILE,
    latest_checkpoint,
    local_copy,
    read_checkpoint,
    run_folder,
)

APP_BUILDER = "shipyard.serve.app:build_app"
SERVE_CONFIG_FILE = "serve_config.yaml"


class ServeError(ShipyardError):
    """Nothing to serve, or Serve could not deploy it."""


@dataclass(frozen=True)
class Service:
    """What `shipyard serve` deploys: the app's name, its export, its options, and its URL."""

    name: str
    export: ExportedModel
    spec: ServeSpec

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.port}"

    @property
    def exposed_without_keys(self) -> bool:
        """Reachable from other machines (not a loopback host) and open to anyone."""
        loopback = self.spec.host in ("localhost", "::1") or self.spec.host.startswith("127.")
        return not loopback and not self.spec.api_keys_env

    def application_args(self) -> dict[str, Any]:
        return {
            "export": str(self.export.folder),
            "serve": self.spec.model_dump(mode="json"),
            "name": self.name,
        }


def prepare_service(
    job: JobSpec,
    checkpoint: str | None = None,
    host: str | None = None,
    port: int | None = None,
) -> Service:
    """Find the checkpoint (default: the job's latest), export it once, apply CLI overrides."""
    overrides = {key: value for key, value in (("host", host), ("port", port)) if value}
    spec = ServeSpec.model_validate({**job.serve.model_dump(), **overrides})
    if spec.api_keys_env and not os.environ.get(spec.api_keys_env, "").strip():
        raise ServeError(
            f"serve.api_keys_env: the environment variable {spec.api_keys_env} is not set, so "
            f"no key would be accepted. To fix: export {spec.api_keys_env}=<key>[,<key>…]."
        )
    return Service(name=job.name, export=_export_for(job, checkpoint), spec=spec)


def write_serve_config(service: Service, folder: Path) -> Path:
    """A config in `serve build` format, so `serve deploy` runs the same app on any cluster."""
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": service.spec.host, "port": service.spec.port},
        "applications": [
            {
                "name": service.name,
                "route_prefix": "/",
                "import_path": APP_BUILDER,
                "args": service.application_args(),
                "deployments": [
                    {"name": DEPLOYMENT_NAME, **deployment_options(service.spec)},
                ],
            }
        ],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SERVE_CONFIG_FILE
    header = (
        f"# Written by `shipyard serve` for job {service.name}. Deploy the same app on a Ray\n"
        f"# cluster where shipyard is installed and this path is readable: serve deploy {path}\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def deploy(service: Service) -> None:
    """Start Serve's HTTP proxy on the service's host and port, and run the app (blocks until ready)."""
    from ray import serve

    serve.start(http_options={"host": service.spec.host, "port": service.spec.port})
    serve.run(build_app(service.application_args()), name=service.name, route_prefix="/")


def serve_status(name: str) -> dict[str, Any]:
    """The app's status and its replicas per state, as Serve reports them."""
    application = _running_application(name)
    deployment = application.deployments[DEPLOYMENT_NAME]
    return {
        "application": name,
        "status": _name(application.status),
        "deployment_status": _name(deployment.status),
        "replicas": {_name(state): count for state, count in deployment.replica_states.items()},
        "message": application.message or deployment.message,
    }


def undeploy(name: str) -> None:
    """Delete the app; Serve's controller and proxies stay for other apps."""
    from ray import serve

    _running_application(name)
    serve.delete(name)


def stop_serve(timeout_s: float = 15.0) -> bool:
    """Shut Serve down (controller, proxies, replicas) before Ray stops; False if it timed out.

    A SIGTERM sent to the whole process group may already have killed Ray's own daemons, and
    then Serve's shutdown would wait forever: it gets `timeout_s`, and Ray's shutdown follows.
    """
    from ray import serve

    stopper = threading.Thread(target=serve.shutdown, daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    return not stopper.is_alive()


def _running_application(name: str) -> Any:
    """Serve's status of the app, or a ServeError if no such app runs on this cluster."""
    from ray import serve

    application = serve.status().applications.get(name)
    if application is None:
        raise ServeError(f"no Serve application named {name!r} is running on this cluster.")
    return application


def _export_for(job: JobSpec, checkpoint: str | None) -> ExportedModel:
    if checkpoint is None:
        saved = latest_checkpoint(job.storage, job.name)
        if saved is None:
            raise ServeError(
                f"job {job.name} has no checkpoint under {job.storage}. To fix: train it first "
                f"(shipyard train …), or give --checkpoint PATH."
            )
        return export_checkpoint(local_copy(saved, run_folder(job.storage, job.name)))
    if is_remote(checkpoint):
        from shipyard.artifacts import EXPORT, fetch

        store = open_store(checkpoint)
        store.check()
        run = run_folder(job.storage, job.name)
        try:
            saved = read_checkpoint(checkpoint)
        except FileNotFoundError:  # no checkpoint metadata there: an artifacts location
            saved = None
        if saved is not None:  # a training checkpoint on S3
            return export_checkpoint(local_copy(saved, run))
        pulled = fetch(store, job.name, run / "artifacts")
        return read_export(pulled / EXPORT)
    folder = Path(checkpoint).expanduser().resolve()
    if (folder / MANIFEST_FILE).is_file():
        return read_export(folder)
    if (folder / METADATA_FILE).is_file():
        return export_checkpoint(read_checkpoint(folder))
    raise ServeError(
        f"--checkpoint {checkpoint}: neither a Shipyard checkpoint (no {METADATA_FILE}) nor an "
        f"export (no {MANIFEST_FILE}). To fix: give a folder such as "
        f"{job.storage}/{job.name}/checkpoint_…"
    )


def _name(state: Any) -> str:
    """Serve's states are str enums; their value is the plain name."""
    return str(getattr(state, "value", state))
