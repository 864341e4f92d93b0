"""`shipyard plan --profile`: real timings in Ray Train workers on this machine (DeepSpeed, gloo)."""

from __future__ import annotations

import pytest
import yaml

from shipyard.cli import main
from shipyard.plan.plan import make_plan
from shipyard.plan.profile import load_profiles
from shipyard.spec.cluster import local_cluster
from shipyard.spec.load import load_job

pytestmark = pytest.mark.integration


def test_profiling_measures_this_cpu_and_the_plan_uses_it(
    ray_session, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path))
    job_file = tmp_path / "small.yaml"
    small = {
        "name": "small",
        "model": {"layers": 2, "heads": 2, "width": 64, "sequence_length": 32},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "micro_batch_size": 4},
    }
    job_file.write_text(yaml.safe_dump(small))
    job = load_job(job_file)
    catalog = make_plan(job, local_cluster()).estimate.step_seconds

    assert main(["plan", str(job_file), "--profile"]) == 0
    assert "profiled CPU (fp32)" in capsys.readouterr().out
    (profile,) = load_profiles(job).values()
    assert 0 < profile.efficiency <= 1.5 and profile.half_efficiency_tokens >= 0
    assert list(profile.seconds_by_micro_batch) == [1, 2, 4, 8, 16]
    assert profile.threads == 1, "the thread count Ray gives a worker of half a CPU"
    # More sequences per micro-batch never take less time.
    times = list(profile.seconds_by_micro_batch.values())
    assert times[-1] > times[0]
    measured = make_plan(job, local_cluster(), load_profiles(job)).estimate
    assert measured.step_seconds != catalog, "the measured curve replaces the catalog's"
    # DeepSpeed's own time beyond the math was measured for the job's ZeRO stage, and used.
    assert set(profile.engine_overhead) == {"1"}
    assert profile.engine_overhead["1"]["step"] > 0
    assert measured.seconds_by_cause["DeepSpeed engine (measured)"] > 0
    assert measured.seconds_by_cause["gradient sync"] == 0, "measured, not modelled"
