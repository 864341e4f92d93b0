"""`shipyard artifacts push|list|pull` (a job's published models) and `shipyard export`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table


def register(commands) -> None:
    """Add `artifacts` to the `shipyard` parser."""
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

    export = commands.add_parser(
        "export", help="write a job's trained model as a folder transformers opens"
    )
    export.add_argument("job", help="path of the job spec YAML")
    export.add_argument("--to", required=True, help="a new folder for the model")
    export.add_argument(
        "--checkpoint", help="a checkpoint folder or s3://…/checkpoint_… (default: the latest)"
    )
    export.set_defaults(command=_export)


def _export(args: argparse.Namespace, console: Console) -> int:
    from shipyard.artifacts import export_to
    from shipyard.spec.load import load_job

    job = load_job(args.job)
    folder = export_to(job, Path(args.to).expanduser().resolve(), args.checkpoint)
    console.print(f"Exported {job.name} to {folder}", highlight=False)
    console.print(
        f"Open it: AutoModelForCausalLM.from_pretrained({str(folder)!r}); fine-tune it: "
        f"model: {{type: huggingface, path: {folder}}}",
        highlight=False,
    )
    return 0


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
