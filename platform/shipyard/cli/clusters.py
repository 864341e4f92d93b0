"""`shipyard cluster`, `submit` and `jobs`: clusters and the jobs sent to them."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shipyard.cli.common import usable_stores


def register(commands) -> None:
    """Add `cluster`, `submit`, `jobs` to the `shipyard` parser."""
    cluster = commands.add_parser(
        "cluster", help="bring a cluster YAML up or down (local, fake multinode or cloud)"
    )
    cluster_actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("up", "start it: ray up for clouds; a Ray head here for local and fake clusters"),
        ("down", "stop it: ray down for clouds; this cluster's own processes here"),
        ("status", "its live nodes by node type, their resources, and its Ray jobs"),
    ):
        each = cluster_actions.add_parser(action, help=text)
        each.add_argument("cluster", help="path of the cluster YAML")
        if action != "status":
            each.add_argument("--dry-run", action="store_true", help="print what would run")
        if action == "up":
            each.add_argument(
                "--port", type=int, default=6379, help="GCS port of a local head (6379)"
            )
            each.add_argument(
                "--dashboard-port", type=int, default=8265, help="its dashboard and Jobs API"
            )
        if action == "status":
            each.add_argument("--address", help="default: the cluster `up` started, RAY_ADDRESS")
    cluster.set_defaults(command=_cluster)

    submit = commands.add_parser(
        "submit",
        help="check and plan a job here, then run it on a cluster through Ray's Jobs API",
    )
    submit.add_argument("job", help="path of the job spec YAML")
    submit.add_argument(
        "--cluster", help="the cluster's YAML: plan for it (and find its Jobs API if `up` here)"
    )
    submit.add_argument(
        "--run", choices=("train", "sweep", "serve"), default="train", help="what the job runs"
    )
    submit.add_argument(
        "--address", help="Jobs API URL (default: RAY_API_SERVER_ADDRESS, or the cluster's)"
    )
    submit.add_argument(
        "--follow", action="store_true", help="stream its logs until it ends (exit 1 unless ok)"
    )
    submit.add_argument(
        "--install-deps",
        action="store_true",
        help="have Ray install Shipyard's pinned requirements (a virtualenv per cluster) "
        "instead of checking the nodes already have them",
    )
    submit.set_defaults(command=_submit)

    jobs = commands.add_parser("jobs", help="the jobs of a cluster: list, status, logs, stop")
    job_actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("list", "every job the cluster knows, newest first"),
        ("status", "one job's status, times and entrypoint"),
        ("logs", "one job's logs (--follow: until it ends)"),
        ("stop", "stop one job and wait until it has"),
    ):
        each = job_actions.add_parser(action, help=text)
        if action != "list":
            each.add_argument("id", help="the submission id `shipyard submit` printed")
        if action == "logs":
            each.add_argument("--follow", action="store_true", help="stream until the job ends")
        each.add_argument("--cluster", help="a cluster YAML brought up here with `cluster up`")
        each.add_argument("--address", help="Jobs API URL (default: RAY_API_SERVER_ADDRESS)")
    jobs.set_defaults(command=_jobs)


def _cluster(args: argparse.Namespace, console: Console) -> int:
    from shipyard.runtime import cluster as launcher
    from shipyard.spec.load import load_cluster

    spec = load_cluster(args.cluster)
    launch = launcher.launch_plan(
        spec,
        Path(args.cluster),
        getattr(args, "port", 6379),
        getattr(args, "dashboard_port", 8265),
    )
    if args.action == "status":
        return _cluster_status(spec, args, console)
    if args.dry_run:
        command = launch.up if args.action == "up" else launch.down
        if not command:  # a local head: down stops its recorded process group
            console.print(f"would stop the process group of {spec.name!r} recorded by `up`")
            return 0
        environment = " ".join(f"{k}={v}" for k, v in launch.environment.items())
        console.print(f"would run: {environment} {' '.join(command)}".strip(), highlight=False)
        if args.action == "up" and launch.on_this_machine:
            console.print(f"then wait for {launcher.expected_nodes(spec)} nodes")
        return 0
    if not launch.on_this_machine:  # Ray's cluster launcher does the work
        return subprocess.run(launch.up if args.action == "up" else launch.down).returncode
    if args.action == "down":
        stopped = launcher.stop_local(spec)
        console.print(f"{spec.name}: {'stopped' if stopped else 'was not up'}")
        return 0
    state = launcher.start_local(spec, launch)
    console.print(
        f"{spec.name} is up at {state['address']} (token authentication on; log {state['log']})\n"
        f"Next: export RAY_ADDRESS={state['address']} RAY_AUTH_MODE=token, then shipyard train "
        f"JOB --cluster {args.cluster}",
        highlight=False,
    )
    return 0


def _cluster_status(spec, args: argparse.Namespace, console: Console) -> int:
    from shipyard.errors import ResourceError
    from shipyard.runtime import cluster as launcher

    address = args.address or launcher.recorded_address(spec) or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ResourceError(
            f"{spec.name}: no address. To fix: shipyard cluster up {args.cluster}, or pass "
            "--address (or set RAY_ADDRESS) for a cluster started elsewhere."
        )
    state = launcher.cluster_state(address)
    if not state["nodes"]:
        raise ResourceError(f"no Ray cluster answers at {address}.")
    nodes = Table(title=f"{spec.name} at {address}: {len(state['nodes'])} nodes")
    for column in ("node type", "node", "CPU", "GPU", "accelerators", "labels"):
        nodes.add_column(column)
    for node in sorted(state["nodes"], key=lambda n: (not n["head"], n["id"])):
        resources = node["resources"]
        accelerators = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
        labels = {k: v for k, v in node["labels"].items() if not k.startswith("ray.io/node-id")}
        nodes.add_row(
            launcher.node_type_of(spec, node),
            node["id"][:12],
            f"{resources.get('CPU', 0):g}",
            f"{resources.get('GPU', 0):g}",
            ", ".join(accelerators),
            ", ".join(f"{k}={v}" for k, v in labels.items()),
        )
    console.print(nodes)
    jobs = Table(title=f"Ray jobs ({len(state['jobs'])})")
    for column in ("job", "status", "entrypoint"):
        jobs.add_column(column)
    for job in state["jobs"]:
        jobs.add_row(job["id"], job["status"].rsplit(".", 1)[-1], job["entrypoint"] or "")
    console.print(jobs)
    return 0


def _submit(args: argparse.Namespace, console: Console) -> int:
    import tempfile

    from shipyard.errors import SpecError
    from shipyard.runtime import jobs
    from shipyard.spec.load import load_cluster, load_job
    from shipyard.storage import is_remote
    from shipyard.train.trainer import check_resumable, plan_for

    # Everything that can be refused is refused here, before anything is sent.
    job = load_job(args.job)
    if args.run == "sweep" and job.sweep is None:
        raise SpecError(f"{args.job}: --run sweep needs a sweep: section. To fix: add one.")
    cluster = load_cluster(args.cluster) if args.cluster else None
    usable_stores(job)
    plan = plan_for(job, cluster)
    if args.run == "train":
        check_resumable(job, plan)
    address = jobs.jobs_address(args.address, _recorded_dashboard(cluster))
    client = jobs.client_for(address)
    with tempfile.TemporaryDirectory(prefix="shipyard-submit-") as folder:
        cluster_file = Path(args.cluster) if args.cluster else None
        submission = jobs.prepare(
            job, plan, args.run, Path(folder), cluster_file, install_deps=args.install_deps
        )
        jobs.submit(client, submission)
        recorded = jobs.record(job, submission, Path(folder), address)
    console.print(
        f"Submitted {submission.id} to {address}: {submission.entrypoint}\n"
        f"Spec, plan and version recorded in {recorded}\n"
        f"Follow it: shipyard jobs logs {submission.id} --follow --address {address}",
        highlight=False,
    )
    if cluster and not cluster.is_local and not is_remote(job.storage):
        console.print(
            f"[yellow]note:[/] storage {job.storage} is a folder: on a remote cluster the "
            "checkpoints stay on its nodes' disks. Use storage: s3://bucket/prefix to keep them.",
            highlight=False,
        )
    if args.follow:
        return _follow_job(client, submission.id, console)
    return 0


def _jobs(args: argparse.Namespace, console: Console) -> int:
    from shipyard.runtime import jobs
    from shipyard.spec.load import load_cluster

    cluster = load_cluster(args.cluster) if args.cluster else None
    client = jobs.client_for(jobs.jobs_address(args.address, _recorded_dashboard(cluster)))
    if args.action == "list":
        _print_jobs(jobs.list_jobs(client), console)
    elif args.action == "status":
        info = jobs.status(client, args.id)
        for name in ("status", "message", "entrypoint", "start_time", "end_time", "metadata"):
            console.print(f"{name + ':':12} {_job_field(info, name)}", highlight=False)
    elif args.action == "logs" and args.follow:
        return _follow_job(client, args.id, console)
    elif args.action == "logs":
        print(jobs.logs(client, args.id), end="")
    else:
        console.print(f"job {args.id}: {jobs.stop(client, args.id)}")
    return 0


def _follow_job(client, submission_id: str, console: Console) -> int:
    from shipyard.runtime import jobs

    state = jobs.follow(client, submission_id, lambda lines: print(lines, end="", flush=True))
    console.print(f"job {submission_id}: {state}", highlight=False)
    return 0 if state == "SUCCEEDED" else 1


def _print_jobs(found: list, console: Console) -> None:
    """One line per job, whole (a table would fold long ids at a narrow terminal)."""
    console.print(f"{len(found)} jobs", highlight=False)
    for info in found:
        fields = [info.submission_id or info.job_id, _job_field(info, "status")]
        fields += [_job_field(info, "start_time") or "-", info.entrypoint or ""]
        console.print("  ".join(fields), highlight=False)


def _job_field(info, name: str) -> str:
    from datetime import datetime

    from shipyard.runtime.jobs import status_name

    value = getattr(info, name, None)
    if value is None:
        return ""
    if name.endswith("_time"):  # the Jobs API gives milliseconds since the epoch
        return datetime.fromtimestamp(value / 1000).isoformat(sep=" ", timespec="seconds")
    return status_name(value)


def _recorded_dashboard(cluster) -> str | None:
    from shipyard.runtime import cluster as launcher

    return launcher.recorded_address(cluster, "dashboard") if cluster else None
