"""The `shipyard` command: parse arguments, call one function, print the outcome."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shipyard.errors import ShipyardError

SPEC_ERROR_EXIT = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors Shipyard understands are printed without a traceback."""
    args = _parser().parse_args(argv)
    console = Console(soft_wrap=True)  # whole lines in logs, whatever the terminal width
    try:
        return args.command(args, console)
    except ShipyardError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return SPEC_ERROR_EXIT
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; Ray was shut down. Re-run to resume.")
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shipyard", description="Train, sweep and serve models on Ray with DeepSpeed."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a job spec (resumes if it has checkpoints)")
    train.add_argument("job", help="path of the job spec YAML, e.g. jobs/tiny-gpt.yaml")
    train.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or embedded)")
    train.add_argument(
        "--stop-at-step", type=int, help="stop at this step with a checkpoint; re-run to continue"
    )
    train.add_argument(
        "--cluster",
        help="the joined cluster's YAML: place ranks by the plan for it (default: as written)",
    )
    train.add_argument("--verbose", action="store_true", help="show Ray's and workers' logs")
    train.set_defaults(command=_train)

    serve = commands.add_parser(
        "serve", help="deploy a job's trained model on Ray Serve (HTTP on 127.0.0.1)"
    )
    serve.add_argument("job", help="path of the job spec YAML whose model to serve")
    serve.add_argument(
        "--checkpoint",
        help="checkpoint (a folder or s3://…/checkpoint_…) or export folder, or an artifacts "
        "location (s3://bucket/prefix) to serve the latest published version from (default: "
        "the job's latest checkpoint)",
    )
    serve.add_argument("--host", help="HTTP host (default: serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default: serve.port, 8000)")
    serve.add_argument(
        "--address",
        help="Ray cluster to deploy to and return (default: RAY_ADDRESS, else run in the "
        "foreground on an embedded Ray until Ctrl-C)",
    )
    actions = serve.add_mutually_exclusive_group()
    actions.add_argument("--status", action="store_true", help="show the deployed app's status")
    actions.add_argument("--shutdown", action="store_true", help="delete the deployed app")
    serve.add_argument("--verbose", action="store_true", help="show Ray's and replicas' logs")
    serve.set_defaults(command=_serve)

    sweep = commands.add_parser(
        "sweep", help="run the job's sweep: Ray Tune trials that are each a training run"
    )
    sweep.add_argument("job", help="path of a job spec YAML with a sweep: section")
    sweep.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or embedded)")
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="only resume an interrupted sweep (a plain re-run also resumes; this fails if "
        "there is nothing to resume)",
    )
    sweep.add_argument("--verbose", action="store_true", help="show Ray's and trials' logs")
    sweep.set_defaults(command=_sweep)

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

    artifacts = commands.add_parser(
        "artifacts", help="publish a job's trained model (with its spec, plan and metrics)"
    )
    actions = artifacts.add_subparsers(dest="action", required=True, metavar="ACTION")
    push = actions.add_parser("push", help="publish the job's latest checkpoint as a version")
    push.add_argument("job", help="path of the job spec YAML")
    push.add_argument("--to", help="folder or s3://bucket/prefix (default: the job's artifacts:)")
    listing = actions.add_parser("list", help="the job's published versions")
    listing.add_argument("job", help="path of the job spec YAML")
    listing.add_argument("--from", dest="source", help="default: the job's artifacts:")
    fetching = actions.add_parser("pull", help="download and verify a published version")
    fetching.add_argument("job", help="path of the job spec YAML")
    fetching.add_argument("--from", dest="source", help="default: the job's artifacts:")
    fetching.add_argument("--version", help="default: the latest")
    fetching.add_argument("--to", default="artifacts", help="local folder (default: artifacts)")
    artifacts.set_defaults(command=_artifacts)

    plan = commands.add_parser("plan", help="validate a job spec and print its parallel plan")
    plan.add_argument("job", help="path of the job spec YAML")
    plan.add_argument(
        "--cluster", help="Ray cluster-launcher YAML to plan for (default: this machine)"
    )
    plan.add_argument(
        "--explain", action="store_true", help="also show the best candidates and why others lost"
    )
    plan.add_argument(
        "--profile",
        action="store_true",
        help="first time the model in Ray Train workers on each node type that is up (this "
        "machine, or the cluster at --address); cached, later plans and trains use it",
    )
    plan.add_argument(
        "--address",
        help="Ray cluster to profile with --profile (default: RAY_ADDRESS, else this machine)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(command=_plan)
    return parser


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
    _usable_stores(job)
    if args.run == "train":
        check_resumable(job)
    plan = plan_for(job, cluster)
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


def _artifacts(args: argparse.Namespace, console: Console) -> int:
    from shipyard.artifacts import artifact_store, fetch, push
    from shipyard.spec.load import load_job
    from shipyard.storage import latest, versions

    job = load_job(args.job)
    store = artifact_store(job, args.to if args.action == "push" else args.source)
    store.check()
    if args.action == "push":
        published = push(job, store)
        console.print(
            f"Published {job.name} step {published.metadata['step']} as version "
            f"{published.version} to {store.uri}",
            highlight=False,
        )
    elif args.action == "list":
        current = latest(store, job.name)
        table = Table(title=f"{job.name} in {store.uri}")
        for column in ("version", "step", "val_loss", "files", "MB", "latest"):
            table.add_column(column)
        for each in versions(store, job.name):
            size = sum(f["bytes"] for f in each.files.values()) / 1e6
            val_loss = each.metadata.get("metrics", {}).get("val_loss")
            table.add_row(
                each.version,
                str(each.metadata.get("step", "")),
                f"{val_loss:.4f}" if val_loss is not None else "",
                str(len(each.files)),
                f"{size:.1f}",
                "←" if current and current.version == each.version else "",
            )
        console.print(table)
    else:
        folder = fetch(store, job.name, Path(args.to), args.version)
        console.print(f"Pulled and verified: {folder}", highlight=False)
        console.print(f"Next: shipyard serve {args.job} --checkpoint {folder / 'export'}")
    return 0


def _plan(args: argparse.Namespace, console: Console) -> int:
    from shipyard.plan.explain import explain_candidates
    from shipyard.plan.plan import candidates, chosen
    from shipyard.plan.profile import load_profiles
    from shipyard.spec.cluster import local_cluster
    from shipyard.spec.load import load_cluster, load_job

    job = load_job(args.job)
    cluster = load_cluster(args.cluster) if args.cluster else local_cluster()
    if args.profile:
        _profile(job, cluster, args, console)
    ranked = candidates(job, cluster, profiles=load_profiles(job))
    plan = chosen(job, cluster, ranked)
    if args.json:
        document = plan.to_dict()
        if args.explain:
            document["candidates"] = [
                {
                    "layout": c.summary,
                    "rejected": c.rejected or None,
                    "step_seconds": c.plan.estimate.step_seconds if c.plan else None,
                }
                for c in ranked
            ]
        print(json.dumps(document, indent=2))
        return 0
    console.print(
        f"[bold]{job.name}[/]: {args.job} on {cluster.source}\n{plan.explain()}", highlight=False
    )
    if args.explain:
        console.print(explain_candidates(ranked), highlight=False)
    return 0


def _profile(job, cluster, args: argparse.Namespace, console: Console) -> None:
    """Time the job on the cluster joined with --address (else this machine) and cache it."""
    from shipyard.plan.profile import save_profile
    from shipyard.plan.profiler import profile_cluster
    from shipyard.runtime.local import ray_runtime
    from shipyard.spec.cluster import local_cluster

    joined = args.address or os.environ.get("RAY_ADDRESS")
    with ray_runtime(args.address):
        profiles, skipped = profile_cluster(job, cluster if joined else local_cluster())
    show = (lambda line: None) if args.json else (lambda line: console.print(line, highlight=False))
    for line in skipped:
        show(f"not profiled: {line}")
    for measured in profiles:
        where = save_profile(measured)
        engine = "".join(
            f"; ZeRO-{stage} engine +{o['micro_step'] * 1000:.0f} ms per micro-step, "
            f"+{o['step'] * 1000:.0f} ms per step"
            for stage, o in measured.engine_overhead.items()
        )
        show(
            f"profiled {measured.device} ({measured.precision}): efficiency "
            f"{measured.efficiency:.3f}, half at {measured.half_efficiency_tokens:.0f} "
            f"tokens per micro-batch{engine}; saved to {where}"
        )


def _sweep(args: argparse.Namespace, console: Console) -> int:
    from shipyard.errors import SpecError
    from shipyard.runtime.local import ray_runtime
    from shipyard.spec.load import load_job
    from shipyard.storage import is_remote
    from shipyard.sweep.report import TrialTable, results_table, write_results
    from shipyard.sweep.search_space import check_sweep
    from shipyard.sweep.tuner import check_resumable_sweep, run_sweep, unfinished_trials

    job = load_job(args.job)  # decide first: a bad spec or sweep fails before Ray starts
    if job.sweep is None:
        raise SpecError(
            f"{args.job}: sweep: the job has no sweep section. To fix: add one, e.g.\n"
            "sweep:\n  space:\n    train.lr: {loguniform: [1.0e-4, 3.0e-3]}"
        )
    dimensions = check_sweep(job, args.job)
    _usable_stores(job)  # a missing bucket or refused credentials fail here too
    check_resumable_sweep(job, must_resume=args.resume)
    paths = [dimension.path for dimension in dimensions]

    def announce(setup) -> None:
        verb = "resuming" if setup.resumed else "starting"
        console.print(
            f"[bold]{job.name}[/]: {verb} a {job.sweep.scheduler} sweep of "
            f"{job.sweep.num_samples} samples over {', '.join(paths)}, "
            f"{setup.concurrent_trials} trials at a time, in {setup.location}",
            highlight=False,
        )

    table = TrialTable(job.sweep.metric, paths, job.train.max_steps)
    with ray_runtime(args.address, verbose=args.verbose):
        setup, grid = run_sweep(
            job, dimensions, callbacks=[table], must_resume=args.resume, on_setup=announce
        )
        unfinished = unfinished_trials(setup.location)
        if unfinished:
            console.print(
                f"Interrupted with {len(unfinished)} trials unfinished; the sweep's state is "
                f"saved in {setup.location}. To resume: shipyard sweep {args.job}"
            )
            return 130
        report = write_results(grid, job, paths, setup.location)
    copied = f"  (the last three also in {report.location})\n" if is_remote(job.storage) else ""
    console.print(results_table(report, paths, job.sweep.metric))
    console.print(
        f"Best: trial {report.best_trial}, {job.sweep.metric} {report.best_metric:.4f}\n"
        f"  checkpoint: {report.best_checkpoint}\n"
        f"  job spec:   {report.best_job_file}\n"
        f"  results:    {report.results_file}\n"
        f"  plot:       {report.plot_file}\n{copied}"
        f"Next: shipyard serve {report.best_job_file} --checkpoint {report.best_checkpoint}",
        highlight=False,
    )
    return 0


def _train(args: argparse.Namespace, console: Console) -> int:
    from shipyard.runtime.local import ray_runtime
    from shipyard.spec.load import load_cluster, load_job
    from shipyard.train.trainer import check_resumable, plan_for, run_training

    job = load_job(args.job)  # decide first: a bad spec or cluster fails before Ray starts
    cluster = load_cluster(args.cluster) if args.cluster else None
    store = _usable_stores(job)  # a missing bucket or refused credentials fail here too
    check_resumable(job)  # and so does a changed model that would resume a checkpoint
    plan = plan_for(job, cluster)
    console.print(f"[bold]{job.name}[/]  {plan.explain()}", highlight=False)
    final_step = min(job.train.max_steps, args.stop_at_step or job.train.max_steps)
    with ray_runtime(args.address, verbose=args.verbose), _progress(console) as progress:
        task = progress.add_task("starting Ray Train workers", total=final_step, status="")

        def show(row: dict) -> None:
            progress.update(
                task, completed=row["step"], description="training", status=_status(row)
            )

        def show_corpus(corpus) -> None:
            progress.update(
                task,
                status=f"{corpus.files} files → {corpus.train_windows} training windows",
            )

        result = run_training(
            job,
            plan=plan,
            on_metrics=show,
            on_corpus=show_corpus,
            stop_at_step=args.stop_at_step,
        )
    _summary(console, job, result, args)
    finished = result.final.get("step", 0) >= job.train.max_steps
    if store and finished and not result.final.get("already_complete"):
        from shipyard.artifacts import push

        published = push(job, store)
        console.print(f"Published as {published.version} to {store.uri}", highlight=False)
    return 0


def _usable_stores(job):
    """Check the job's S3 storage and its artifacts location can be used; the latter's store."""
    from shipyard.storage import is_remote, open_store

    if is_remote(job.storage):
        open_store(job.storage).check()
    if not job.artifacts:
        return None
    store = open_store(job.artifacts)
    store.check()
    return store


def _serve(args: argparse.Namespace, console: Console) -> int:
    from shipyard.runtime.local import ray_runtime
    from shipyard.serve import deployment
    from shipyard.spec.load import load_job
    from shipyard.train.checkpoint import run_folder

    job = load_job(args.job)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if (args.status or args.shutdown) and not address:
        raise ShipyardError(
            "--status and --shutdown act on a running cluster. To fix: give --address or set "
            "RAY_ADDRESS (a foreground `shipyard serve` stops with Ctrl-C)."
        )
    if args.status or args.shutdown:
        with ray_runtime(address, verbose=args.verbose):
            if args.shutdown:
                deployment.undeploy(job.name)
                console.print(f"Deleted the Serve application {job.name}.")
            else:
                print(json.dumps(deployment.serve_status(job.name), indent=2))
        return 0
    # Decide first: a bad checkpoint fails before Ray starts.
    service = deployment.prepare_service(job, args.checkpoint, args.host, args.port)
    config = deployment.write_serve_config(service, run_folder(job.storage, job.name))
    console.print(
        f"[bold]{job.name}[/]: serving step {service.export.step} from {service.export.folder}",
        highlight=False,
    )
    with ray_runtime(address, verbose=args.verbose):
        with console.status("starting Ray Serve replicas"):
            deployment.deploy(service)
        console.print(_serving_summary(service, config), highlight=False)
        if address:
            console.print(
                f"Deployed to {address}; stop it with: shipyard serve {args.job} --shutdown"
            )
            return 0
        _wait_for_stop_signal(console)
        deployment.stop_serve()
    console.print("Stopped: Serve and Ray were shut down.")
    return 0


def _serving_summary(service, config: Path) -> str:
    return (
        f"Serving on {service.url}  (GET /v1/health, GET /v1/model, POST /v1/generate)\n"
        f"Try: curl -s {service.url}/v1/generate -H 'content-type: application/json' "
        f"""-d '{{"prompt": "def main():", "max_new_tokens": 32}}'\n"""
        f"Serve config for `serve deploy` on a cluster: {config}"
    )


def _wait_for_stop_signal(console: Console) -> None:
    """Block until Ctrl-C or SIGTERM, like `serve run`."""
    stop = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stop.set())
    console.print("Press Ctrl-C to stop.")
    while not stop.wait(timeout=1.0):
        pass


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


def _status(row: dict) -> str:
    parts = [f"loss {row['loss']:.4f}"] if "loss" in row else []
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.4f}")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    return "  ".join(parts)


def _summary(console: Console, job, result, args: argparse.Namespace) -> None:
    final = result.final
    table = Table(title=f"{job.name}: step {final.get('step', '?')} of {job.train.max_steps}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("loss", "val_loss", "lr", "tokens_per_s", "step_time_s", "epoch"):
        if key in final:
            table.add_row(key, f"{final[key]:.4g}")
    console.print(table)
    if final.get("already_complete"):
        console.print("Nothing to do: this job already reached train.max_steps.")
    elif final.get("resumed_from_step"):
        console.print(f"Resumed from the checkpoint at step {final['resumed_from_step']}.")
    console.print(f"Checkpoint: {result.checkpoint_path}", highlight=False)
    if final.get("step", 0) < job.train.max_steps:
        console.print(f"Next: shipyard train {args.job}   (continues from this checkpoint)")
    else:
        console.print(f"Next: raise train.max_steps in {args.job} and re-run to train further.")


if __name__ == "__main__":
    sys.exit(main())
