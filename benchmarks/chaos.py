"""Chaos: Shipyard under failures and hostile input, measured, in one table.

Everything runs on this machine, sends traffic only to 127.0.0.1, and stops by itself:
  serve   a Serve replica's process SIGKILLed under a closed loop of 16 clients: success rate
          without retries (goal >= 0.99), with one client retry (goal 1.0), and the seconds
          until the replacement replica answers
  fuzz    schemathesis, from the server's own OpenAPI document: responses with status 5xx
          (goal 0)
  inputs  the malformed-input corpus of chaos_inputs.py (job specs, cluster YAMLs, corpora,
          HTTP bodies, artifact manifests): clean errors, tracebacks (goal 0), files written
          outside their folder (goal 0)
  disk    a full disk during a checkpoint and during an export, on a small tmpfs the benchmark
          mounts (root only; else RLIMIT_FSIZE stands in, and the table says so): a clear
          error, and the previous checkpoint intact and loadable
  s3      the S3 endpoint (moto's server, a process on 127.0.0.1) frozen (SIGSTOP) during a
          checkpoint upload and thawed 20 s later (a restarted moto would have lost every
          object): the run retries or fails clearly; a re-run resumes from the last complete
          checkpoint
  node    a worker node of cluster/fake_hetero.yaml (its raylet) SIGKILLed mid-training: the
          run finishes with the uninterrupted run's final loss (rel 1e-5); restarts counted

    .venv/bin/python benchmarks/chaos.py [--only node,serve,fuzz,inputs,disk,s3] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos_inputs

from shipyard.errors import ShipyardError
from shipyard.models.gpt import GPT
from shipyard.runtime.local import free_port, start_local_ray
from shipyard.serve.deployment import Service, deploy, stop_serve
from shipyard.serve.export import write_export
from shipyard.spec.job import JobSpec, ServeSpec
from shipyard.spec.load import validate

SECTIONS = ("node", "serve", "fuzz", "inputs", "disk", "s3")
REPO = Path(__file__).resolve().parent.parent
MODEL = "chaos"
# A tiny GPT and a short run: the failures, not the model, are what is measured.
TINY = {
    "model": {"layers": 2, "heads": 2, "width": 32, "sequence_length": 32},
    "data": {"max_bytes": 200_000},
    "train": {
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "zero_stage": 1,
        "micro_batch_size": 4,
        "gradient_accumulation": 2,
        "lr": 0.003,
        "warmup_steps": 4,
        "max_steps": 24,
        "log_every": 4,
        "eval_every": 4,
        "checkpoint_every": 4,
        "keep_checkpoints": 3,
        "seed": 11,
    },
    "failure": {"max_failures": 0},
    "tracking": {"mlflow": False, "tensorboard": False},
}


LONGER_RUN = {
    **TINY["train"],
    "max_steps": 160,
    "log_every": 10,
    "eval_every": 20,
    "checkpoint_every": 20,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated")
    parser.add_argument("--seconds", type=float, default=60, help="the replica-kill load's length")
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: {sorted(unknown)} are not sections; choose from {SECTIONS}")
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="shipyard-chaos-") as scratch:
        root = Path(scratch)
        os.environ["SHIPYARD_CACHE"] = str(root / "cache")
        if "node" in chosen:  # a cluster of its own, driven through the CLI, before local Ray
            rows += node_kill(root / "node")
        start_local_ray(logging_level=logging.WARNING, log_to_driver=False)
        try:
            if {"serve", "fuzz", "inputs"} & set(chosen):
                with served_model(root) as url:
                    if "serve" in chosen:
                        rows += replica_kill(url, args.seconds)
                    if "fuzz" in chosen:
                        rows += fuzz(url, root / "fuzz")
                    if "inputs" in chosen:
                        rows += malformed_inputs(url, root / "inputs")
            if "disk" in chosen:
                rows += disk_full(root / "disk")
            if "s3" in chosen:
                rows += s3_outage(root / "s3")
        finally:
            import ray

            ray.shutdown()
    print_table(rows)


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(measure) for _, measure, _ in rows) if rows else 10
    print("\n" + "=" * (width + 60))
    for section, measure, value in rows:
        print(f"{section:7s} {measure:{width}s}  {value}")


def tiny_job(name: str, storage: str, **changes: Any) -> JobSpec:
    document = {**TINY, "name": name, "storage": storage, **changes}
    return validate(JobSpec, document, source=f"<chaos job {name}>")


@contextmanager
def served_model(root: Path):
    """An untrained tiny GPT behind Serve: 2 replicas, so one can die while the other works."""
    job = tiny_job(MODEL, str(root / "runs"))
    export = write_export(root / "export", GPT(job.model, 0).state_dict(), job.model, MODEL, step=0)
    spec = ServeSpec(
        port=free_port(),
        num_replicas=2,
        cpus_per_replica=0.5,
        max_batch_size=16,
        max_queued_requests=64,
        request_timeout_s=30,
    )
    service = Service(MODEL, export, spec)
    deploy(service)
    try:
        yield service.url
    finally:
        stop_serve()


# --- serve: a replica killed under load ---------------------------------------------------


def replica_kill(url: str, seconds: float) -> list[tuple[str, str, str]]:
    """16 closed-loop clients for `seconds`; one replica's process is SIGKILLed at a third."""
    stop = threading.Event()
    outcomes: list[tuple[bool, bool]] = []  # (first attempt ok, ok after one retry)
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        body = {"model": MODEL, "prompt": "def ", "max_tokens": 8, "temperature": 0}
        while not stop.is_set():
            first = _ok(session, url, body)
            again = first or _ok(session, url, body)
            with lock:
                outcomes.append((first, again))

    before = _replica_ids(url, 40)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(seconds / 3)
    victim = _replica_pids()[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    replaced = _first_answer_from_a_new_replica(url, before, killed_at, deadline=seconds)
    time.sleep(max(0.0, seconds * 2 / 3 - (time.monotonic() - killed_at)))
    stop.set()
    for thread in threads:
        thread.join(60)
    total = len(outcomes)
    first = sum(ok for ok, _ in outcomes) / total
    retried = sum(ok for _, ok in outcomes) / total
    return [
        ("serve", "requests in the closed loop (16 clients)", f"{total}"),
        ("serve", "success without retries (goal >= 0.99)", f"{first:.4f}"),
        ("serve", "success with one client retry (goal 1.0)", f"{retried:.4f}"),
        (
            "serve",
            "seconds until the replacement answers",
            f"{replaced:.1f}" if replaced is not None else f"none within {seconds:.0f} s",
        ),
    ]


def _ok(session: requests.Session, url: str, body: dict) -> bool:
    try:
        answer = session.post(f"{url}/v1/completions", json=body, timeout=30)
    except requests.RequestException:
        return False
    return answer.status_code == 200 and bool(answer.json()["choices"])


def _replica_pids() -> list[int]:
    """The Serve replicas' processes (Ray titles them `ray::ServeReplica:<app>:<deployment>`)."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        with suppress(psutil.Error):
            if " ".join(process.cmdline()).startswith("ray::ServeReplica"):
                found.append(process.pid)
    return found


def _replica_ids(url: str, probes: int) -> set[str]:
    """The replica ids that /v1/health answers from (Serve spreads probes over replicas)."""
    seen = set()
    for _ in range(probes):
        with suppress(requests.RequestException, KeyError, ValueError):
            seen.add(requests.get(f"{url}/v1/health", timeout=5).json()["replica"])
    return seen


def _first_answer_from_a_new_replica(
    url: str, before: set[str], since: float, deadline: float
) -> float | None:
    while time.monotonic() - since < deadline:
        with suppress(requests.RequestException, KeyError, ValueError):
            replica = requests.get(f"{url}/v1/health", timeout=5).json()["replica"]
            if replica not in before:
                return time.monotonic() - since
        time.sleep(0.2)
    return None


# --- fuzz: schemathesis from the OpenAPI document -----------------------------------------


def fuzz(url: str, folder: Path) -> list[tuple[str, str, str]]:
    folder.mkdir(parents=True)
    har = folder / "requests.har"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{url}/openapi.json",
        "--checks=not_a_server_error",
        "--max-examples=60",
        "--workers=1",
        "--seed=7",
        "--request-timeout=30",
        "--max-time=240",
        "--suppress-health-check=all",
        "--report=har",
        f"--report-har-path={har}",
    ]
    subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=folder)
    entries = json.loads(har.read_text())["log"]["entries"] if har.is_file() else []
    statuses = [entry["response"]["status"] for entry in entries]
    failing = sorted(
        {
            (e["request"]["url"], e["response"]["status"])
            for e in entries
            if e["response"]["status"] >= 500
        }
    )
    rows = [
        ("fuzz", "requests schemathesis sent", f"{len(statuses)}"),
        ("fuzz", "responses with status 5xx (goal 0)", f"{sum(s >= 500 for s in statuses)}"),
        (
            "fuzz",
            "responses 2xx / 4xx",
            f"{sum(200 <= s < 300 for s in statuses)} / {sum(400 <= s < 500 for s in statuses)}",
        ),
    ]
    rows += [("fuzz", "  5xx at", f"{where} ({status})") for where, status in failing[:5]]
    return rows


# --- inputs: the malformed-input corpus --------------------------------------------------


def malformed_inputs(url: str, folder: Path) -> list[tuple[str, str, str]]:
    folder.mkdir(parents=True)
    outcomes = []
    for name, content in chaos_inputs.job_spec_cases().items():
        outcomes.append(
            _contained(
                folder,
                "job spec",
                name,
                lambda case, c=content: chaos_inputs.run_plan_case(case, c, None),
            )
        )
    good_job = chaos_inputs.job_text()
    for name, content in chaos_inputs.cluster_cases().items():
        outcomes.append(
            _contained(
                folder,
                "cluster YAML",
                name,
                lambda case, c=content: chaos_inputs.run_plan_case(case, good_job, c),
            )
        )
    for name, make in chaos_inputs.corpus_cases().items():
        outcomes.append(
            _contained(folder, "corpus", name, lambda case, m=make: _corpus_case(case, m))
        )
    for name, (body, expected) in chaos_inputs.http_cases(MODEL).items():
        outcomes.append(
            _contained(
                folder, "HTTP body", name, lambda case, b=body, e=expected: _http_case(url, b, e)
            )
        )
    for name, (key, text) in chaos_inputs.manifest_cases("VERSION").items():
        outcomes.append(
            _contained(
                folder, "manifest", name, lambda case, k=key, t=text: _manifest_case(case, k, t)
            )
        )
    return _input_rows(outcomes)


def _contained(folder: Path, kind: str, name: str, run) -> chaos_inputs.Outcome:
    """Run one case in its own folder; files that appear anywhere else under the benchmark's
    scratch folder, or at the absolute paths the cases aim at, were written outside it."""
    case = folder / f"{len(list(folder.iterdir())):03d}"
    scratch = folder.parent
    before = _files(scratch)
    try:
        verdict, detail = run(case)
    except ShipyardError as error:
        verdict, detail = "clean", str(error).splitlines()[0][:160]
    except Exception as error:  # what the case exists to find: an error that is not ours
        verdict, detail = "traceback", f"{type(error).__name__}: {str(error)[:160]}"
    outside = sorted(str(p) for p in _files(scratch) - before if case not in p.parents)
    outside += [p for p in ("/tmp/shipyard-chaos-escaped", "/tmp/escaped") if Path(p).exists()]
    return chaos_inputs.Outcome(kind, name, verdict, detail, outside)


def _files(folder: Path) -> set[Path]:
    ignored = {"cache", "fuzz"}  # Shipyard's own cache; schemathesis' reports
    return {
        p
        for p in folder.rglob("*")
        if p.is_file() and not ignored & set(p.relative_to(folder).parts[:1])
    }


def _corpus_case(case: Path, make) -> tuple[str, str]:
    from shipyard.data.corpus import prepare_corpus
    from shipyard.plan.plan import make_plan
    from shipyard.train.trainer import check_enough_data

    case.mkdir(parents=True)
    sections = make(case)
    job = tiny_job("corpus", str(case / "runs"), **sections)
    corpus = prepare_corpus(job)
    check_enough_data(corpus, make_plan(job), job)
    return "accepted", f"{corpus.tokens}"


def _http_case(url: str, body: bytes, expected: int) -> tuple[str, str]:
    headers = {"content-type": "application/json"}
    answer = requests.post(f"{url}/v1/completions", data=body, headers=headers, timeout=60)
    status = answer.status_code
    if status >= 500:
        return "traceback", f"{status}: {answer.text[:120]}"
    if status < 300:
        return ("accepted" if expected == 2 else "traceback"), f"{status}"
    shaped = set(answer.json().get("error", {})) == {"message", "type", "param", "code"}
    return (
        "clean" if shaped else "traceback"
    ), f"{status}: {answer.json()['error']['message'][:120]}"


def _manifest_case(case: Path, key: str, text: str) -> tuple[str, str]:
    from shipyard.storage import latest, open_store, publish, pull

    case.mkdir(parents=True)
    (case / "artifact").mkdir()
    (case / "artifact" / "weights.bin").write_bytes(b"w" * 100)
    store = open_store(case / "store")
    published = publish(store, "probe", case / "artifact")
    store.put_text(
        key.replace("VERSION", published.version), text.replace("VERSION", published.version)
    )
    manifest = latest(store, "probe")
    pull(store, manifest, case / "pulled")
    return "accepted", "pulled"


def _input_rows(outcomes: list[chaos_inputs.Outcome]) -> list[tuple[str, str, str]]:
    rows = []
    for kind in dict.fromkeys(o.kind for o in outcomes):
        mine = [o for o in outcomes if o.kind == kind]
        clean = sum(o.verdict == "clean" for o in mine)
        rows.append(("inputs", f"{kind}: cases / clean errors", f"{len(mine)} / {clean}"))
    tracebacks = [o for o in outcomes if o.verdict == "traceback"]
    accepted = [o for o in outcomes if o.verdict == "accepted" and not _expected_accept(o)]
    outside = [o for o in outcomes if o.outside]
    rows += [
        ("inputs", "cases in all", f"{len(outcomes)}"),
        ("inputs", "tracebacks (goal 0)", f"{len(tracebacks)}"),
        ("inputs", "accepted though malformed", f"{len(accepted)}"),
        (
            "inputs",
            "files written outside their folder (goal 0)",
            f"{sum(len(o.outside) for o in outside)}",
        ),
    ]
    for o in tracebacks + accepted + outside:
        rows.append(
            ("inputs", f"  {o.kind}: {o.case}", f"{o.verdict}: {o.detail} {o.outside or ''}")
        )
    return rows


def _expected_accept(outcome: chaos_inputs.Outcome) -> bool:
    return outcome.kind == "HTTP body" and outcome.case in (
        "temperature 1e-40",
        "top_p just above 0",
    )


# --- disk: full during a checkpoint and an export ----------------------------------------


def disk_full(folder: Path) -> list[tuple[str, str, str]]:
    from shipyard.serve.export import export_checkpoint, load_exported_model
    from shipyard.train.checkpoint import latest_checkpoint
    from shipyard.train.trainer import run_training

    folder.mkdir(parents=True)
    disk = folder / "disk"
    disk.mkdir()
    mounted = _mount_tmpfs(disk, megabytes=24)
    rows = [("disk", "small file system", "tmpfs of 24 MiB" if mounted else "none (not root)")]
    if not mounted:
        return [*rows, ("disk", "skipped", "mounting a tmpfs needs root")]
    try:
        job = tiny_job("full", str(disk / "runs"))
        run_training(job, stop_at_step=8)
        saved = latest_checkpoint(job.storage, job.name)
        before = _digests(Path(saved.path))
        ballast = _fill(disk, leave_bytes=_folder_bytes(Path(saved.path)) // 3)
        checkpoint = _outcome(lambda: run_training(job) and "no error: training finished")
        rows.append(("disk", "full during a checkpoint", checkpoint))
        newest = latest_checkpoint(job.storage, job.name)
        intact = _digests(Path(saved.path)) == before
        rows.append(
            (
                "disk",
                "resumable checkpoint afterwards",
                f"step {newest.step}; step {saved.step} intact: {intact}",
            )
        )
        exported = _outcome(lambda: export_checkpoint(newest) and "no error")
        rows.append(("disk", "full during an export", exported))
        ballast.unlink()
        model = load_exported_model(export_checkpoint(newest))
        rows.append(
            (
                "disk",
                "that checkpoint loads once there is room",
                f"{sum(p.numel() for p in model.parameters())} parameters",
            )
        )
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    return rows


def _outcome(run) -> str:
    """What `run()` says it did, or the error it raised: ours (clear) or any other."""
    try:
        return run()
    except ShipyardError as error:
        return "clear error: " + " ".join(str(error).split())[:110]
    except Exception as error:
        return f"TRACEBACK {type(error).__name__}: {str(error)[:100]}"


def _mount_tmpfs(folder: Path, megabytes: int) -> bool:
    if os.geteuid() != 0:
        return False
    answer = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
        capture_output=True,
    )
    return answer.returncode == 0


def _fill(disk: Path, leave_bytes: int) -> Path:
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free - leave_bytes
    with ballast.open("wb") as file:
        file.truncate(0)
        chunk = b"\0" * (1 << 20)
        while free > 0:
            file.write(chunk[: min(len(chunk), free)])
            free -= len(chunk)
    return ballast


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _digests(folder: Path) -> dict[str, str]:
    from shipyard.storage import sha256_of

    return {str(p.relative_to(folder)): sha256_of(p) for p in folder.rglob("*") if p.is_file()}


# --- s3: the endpoint frozen during an upload --------------------------------------------


def s3_outage(folder: Path) -> list[tuple[str, str, str]]:
    import boto3

    from shipyard.train.checkpoint import saved_checkpoints
    from shipyard.train.trainer import run_training

    folder.mkdir(parents=True)
    port = free_port()
    log = (folder / "moto.log").open("w")
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rows = []
    try:
        _wait_for(f"http://127.0.0.1:{port}/moto-api/")
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
            AWS_ACCESS_KEY_ID="chaos",
            AWS_SECRET_ACCESS_KEY="chaos",
            AWS_DEFAULT_REGION="us-east-1",
        )
        boto3.client("s3").create_bucket(Bucket="chaos")
        job = tiny_job("outage", "s3://chaos/runs")
        frozen = threading.Event()

        def freeze_at_a_checkpoint(row: dict) -> None:
            if row["step"] == 12 and not frozen.is_set():  # its checkpoint is being uploaded
                frozen.set()
                moto.send_signal(signal.SIGSTOP)
                threading.Timer(20, moto.send_signal, args=(signal.SIGCONT,)).start()

        started = time.monotonic()

        def frozen_run() -> str:
            result = run_training(job, on_metrics=freeze_at_a_checkpoint)
            seconds = time.monotonic() - started
            return f"finished at step {result.final.get('step')} in {seconds:.0f} s"

        outcome = _outcome(frozen_run)
        rows.append(("s3", "endpoint frozen 20 s at the step-12 upload", outcome))
        registered = [c.step for c in saved_checkpoints(job.storage, job.name)]
        rows.append(("s3", "complete checkpoints registered", f"{registered}"))
        if registered and registered[-1] == job.train.max_steps:
            rerun = "nothing to resume: the run had finished"
        else:
            again = run_training(job)
            resumed = again.history[0].get("resumed_from_step") if again.history else None
            rerun = f"resumed from step {resumed}, ended at {again.final.get('step')}"
        rows.append(("s3", "a re-run after it", rerun))
    finally:
        with suppress(ProcessLookupError):
            moto.send_signal(signal.SIGCONT)
        moto.kill()
        moto.wait()
    return rows


# --- node: a worker node killed mid-training -----------------------------------------------


def node_kill(folder: Path) -> list[tuple[str, str, str]]:
    """The same job on the fake heterogeneous cluster, uninterrupted and with the T4 node's
    raylet SIGKILLed after step 30: Ray restarts the workers on a new node from the last
    checkpoint."""
    folder.mkdir(parents=True)
    cluster = _with_a_spare_t4(REPO / "cluster" / "fake_hetero.yaml", folder)
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environment |= {"RAY_AUTH_MODE": "token", "SHIPYARD_CACHE": str(folder / "cache")}
    port, dashboard = free_port(), free_port()
    shipyard = [sys.executable, "-m", "shipyard"]
    up = subprocess.run(
        [
            *shipyard,
            "cluster",
            "up",
            str(cluster),
            "--port",
            str(port),
            "--dashboard-port",
            str(dashboard),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    if up.returncode != 0:
        return [("node", "cluster up failed", up.stderr.strip().splitlines()[-1][:120])]
    try:

        def train(name: str, kill_after_step: int | None) -> tuple[list[dict], str]:
            job = {
                **TINY,
                "name": name,
                "storage": str(folder / "runs"),
                "train": LONGER_RUN,  # long enough for Ray to see the node die mid-run
                "failure": {"max_failures": 2},
            }
            job_file = folder / f"{name}.yaml"
            job_file.write_text(json.dumps(job))
            metrics = folder / "runs" / name / "metrics.jsonl"
            command = [
                *shipyard,
                "train",
                str(job_file),
                "--cluster",
                str(cluster),
                "--address",
                f"127.0.0.1:{port}",
            ]
            process = subprocess.Popen(
                command,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            killed = ""
            while kill_after_step is not None and process.poll() is None and not killed:
                if any(row["step"] > kill_after_step for row in _rows(metrics)):
                    killed = _kill_node_of_a_rank("t4_node")
                time.sleep(0.2)
            try:
                output, _ = process.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
                killed += " (the run did not end within 600 s)"
            if process.returncode != 0:
                killed += f" (exit {process.returncode}: {output.strip().splitlines()[-1:]})"
            return _rows(metrics), killed

        steady, _ = train("steady", None)
        faulted, killed = train("killed", 30)
    finally:
        subprocess.run(
            [*shipyard, "cluster", "down", str(cluster)],
            env=environment,
            capture_output=True,
            timeout=300,
        )
    last = lambda rows: next((r for r in reversed(rows) if "loss" in r), {})  # noqa: E731
    restarts = sum("node_types" in row for row in faulted) - 1
    difference = abs(last(faulted).get("loss", float("nan")) - last(steady)["loss"])
    return [
        ("node", "killed", killed or "nothing (no t4_node raylet found)"),
        (
            "node",
            "final step, uninterrupted / killed",
            f"{last(steady).get('step')} / {last(faulted).get('step')}",
        ),
        (
            "node",
            "final loss, relative difference (goal <= 1e-5)",
            f"{difference / last(steady)['loss']:.2e}",
        ),
        ("node", "restarts of the worker group", f"{restarts}"),
    ]


def _rows(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _with_a_spare_t4(cluster: Path, folder: Path) -> Path:
    """The fake heterogeneous cluster with a second T4 node. Ray's fake provider never learns
    that a node it started has died, so it would not start a replacement as a cloud's
    autoscaler does; the spare stands in for that replacement."""
    import yaml

    document = yaml.safe_load(cluster.read_text())
    document["cluster_name"] = "chaos-hetero"
    document["max_workers"] = 3
    document["available_node_types"]["t4_node"] |= {"min_workers": 2, "max_workers": 2}
    spare = folder / "fake_hetero_spare.yaml"
    spare.write_text(yaml.safe_dump(document))
    return spare


def _kill_node_of_a_rank(node_type: str) -> str:
    """SIGKILL the fake node of `node_type` that hosts a Train worker, whole: its raylet and
    every process it started (the fake provider names the type in each node's environment).
    A real node's failure takes its workers with it; a fake node's would linger."""
    import psutil

    for process in psutil.process_iter(["name"]):
        try:
            if process.info["name"] != "raylet":
                continue
            if process.environ().get("RAY_NODE_TYPE_NAME") != node_type:
                continue
            children = process.children(recursive=True)
            titles = " ".join(" ".join(child.cmdline()) for child in children)
        except psutil.Error:
            continue
        if "TrainWorker" not in titles:
            continue  # the spare
        process.kill()
        for child in children:
            with suppress(psutil.Error):
                child.kill()
        return f"the {node_type} hosting a rank: its raylet and {len(children)} processes"
    return ""


def _wait_for(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


if __name__ == "__main__":
    main()
