"""`shipyard train`, `sweep` and `serve`: a job on the joined (or an embedded) Ray."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shipyard.cli.common import usable_stores
from shipyard.errors import ShipyardError


def _step_number(text: str) -> int:
    """A training step to stop at: a whole number from 1 (0 would mean "not set" below)."""
    try:
        step = int(text)
    except ValueError:
        step = 0
    if step < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step: give a whole number >= 1")
    return step


def register(commands) -> None:
    """Add `train`, `serve`, `sweep` to the `shipyard` parser."""
    train = commands.add_parser("train", help="train a job spec (resumes if it has checkpoints)")
    train.add_argument("job", help="path of the job spec YAML, e.g. jobs/tiny-gpt.yaml")
    train.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or embedded)")
    train.add_argument(
        "--stop-at-step",
        type=_step_number,
        help="stop at this step (1 or more) with a checkpoint; re-run to continue",
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


def _train(args: argparse.Namespace, console: Console) -> int:
    from shipyard.lock import exclusive_run
    from shipyard.runtime.local import ray_runtime
    from shipyard.spec.load import check_data_source, load_cluster, load_job
    from shipyard.train.trainer import check_resumable, plan_for, run_training

    job = load_job(args.job)  # decide first: a bad spec or cluster fails before Ray starts
    check_data_source(job, args.job)
    cluster = load_cluster(args.cluster) if args.cluster else None
    store = usable_stores(job)  # a missing bucket or refused credentials fail here too
    plan = plan_for(job, cluster)
    check_resumable(job, plan)  # and so does a changed job that would resume a checkpoint
    console.print(f"[bold]{job.name}[/]  {plan.explain()}", highlight=False)
    final_step = min(job.train.max_steps, args.stop_at_step or job.train.max_steps)
    running = exclusive_run(job.storage, job.name)  # and so does another run of the job
    with running, ray_runtime(args.address, verbose=args.verbose), _progress(console) as progress:
        task = progress.add_task("starting Ray Train workers", total=final_step, status="")

        def show(row: dict) -> None:
            progress.update(
                task, completed=row["step"], description="training", status=_status(row)
            )
            if not console.is_terminal:  # a log gets one whole line per log step instead
                console.print(f"step {row['step']}/{final_step}  {_status(row)}", highlight=False)

        def show_corpus(corpus) -> None:
            progress.update(
                task,
                status=_corpus_status(corpus, job.model.sequence_length),
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


def _sweep(args: argparse.Namespace, console: Console) -> int:
    from shipyard.errors import SpecError
    from shipyard.lock import exclusive_run
    from shipyard.runtime.local import ray_runtime
    from shipyard.spec.job import SWEEP_SUFFIX
    from shipyard.spec.load import check_data_source, load_job
    from shipyard.storage import is_remote
    from shipyard.sweep.report import TrialTable, results_table, write_results
    from shipyard.sweep.search_space import check_sweep
    from shipyard.sweep.tuner import check_resumable_sweep, run_sweep

    job = load_job(args.job)  # decide first: a bad spec or sweep fails before Ray starts
    check_data_source(job, args.job)
    if job.sweep is None:
        raise SpecError(
            f"{args.job}: sweep: the job has no sweep section. To fix: add one, e.g.\n"
            "sweep:\n  space:\n    train.lr: {loguniform: [1.0e-4, 3.0e-3]}"
        )
    dimensions = check_sweep(job, args.job)
    usable_stores(job)  # a missing bucket or refused credentials fail here too
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
    running = exclusive_run(job.storage, f"{job.name}{SWEEP_SUFFIX}", "sweep")  # one at a time
    with running, ray_runtime(args.address, verbose=args.verbose):
        setup, grid, unfinished = run_sweep(
            job, dimensions, callbacks=[table], must_resume=args.resume, on_setup=announce
        )
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
    if service.exposed_without_keys:
        console.print(
            f"[yellow]Warning:[/] serving on {service.spec.host}, which other machines can "
            "reach, with no API keys: anyone who reaches the port can use the model. Set "
            "serve.api_keys_env, or serve on 127.0.0.1.",
            highlight=False,
        )
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
    key = " -H 'authorization: Bearer $KEY'" if service.spec.api_keys_env else ""
    return (
        f"Serving {service.name} on {service.url}/v1 (OpenAI API: completions, chat/completions, "
        "models; GET /v1/health)\n"
        f"Try: curl -s {service.url}/v1/completions{key} -H 'content-type: application/json' "
        f"""-d '{{"model": "{service.name}", "prompt": "def main():", "max_tokens": 32}}'\n"""
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
        disable=not console.is_terminal,
    )


def _corpus_status(corpus, sequence_length: int) -> str:
    how = "reused" if corpus.reused else "tokenized"
    return (
        f"{corpus.files} files, {corpus.tokens['train']:,} training tokens ({how}, "
        f"{corpus.tokenizer.name}) → {corpus.windows('train', sequence_length):,} windows"
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
    for command in result.tracking.commands() if result.tracking else []:
        console.print(f"Look: {command}", highlight=False)
    if final.get("step", 0) < job.train.max_steps:
        console.print(f"Next: shipyard train {args.job}   (continues from this checkpoint)")
        return
    console.print(
        f"Next: shipyard serve {args.job}   (HTTP on 127.0.0.1:{job.serve.port})\n"
        f"      shipyard export {args.job} --to models/{job.name}   (a folder transformers "
        "opens)\n"
        f"      raise train.max_steps in {args.job} and re-run to train further.",
        highlight=False,
    )
