"""`shipyard plan`: a job's parallel plan for a cluster, measured with --profile."""

from __future__ import annotations

import argparse
import json
import os

from rich.console import Console


def register(commands) -> None:
    """Add `plan` to the `shipyard` parser."""
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


def _plan(args: argparse.Namespace, console: Console) -> int:
    from shipyard.plan.explain import explain_candidates
    from shipyard.plan.plan import candidates, chosen
    from shipyard.plan.profile import load_profiles
    from shipyard.spec.cluster import local_cluster
    from shipyard.spec.load import check_data_source, load_cluster, load_job

    job = load_job(args.job)
    check_data_source(job, args.job)
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
    from shipyard.runtime.local import ray_runtime
    from shipyard.spec.cluster import local_cluster
    from shipyard.train.profiler import profile_cluster

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
