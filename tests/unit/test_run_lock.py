"""One run of a job at a time, and a dead run's lock taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml

from shipyard.cli import main
from shipyard.lock import JobBusyError, exclusive_run, lock_file

HOLD = """
import sys, time
from shipyard.lock import exclusive_run
with exclusive_run(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process running job `j` (the lock as `shipyard train` takes it)."""
    storage = str(tmp_path / "runs")
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, storage, "j"], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    yield storage, process
    process.kill()
    process.wait()


def test_a_second_run_is_refused_naming_the_first_until_it_dies(holder, write_job, capsys):
    storage, process = holder
    job = write_job({"name": "j", "storage": storage})
    assert main(["train", str(job)]) == 2  # refused before Ray starts: no Ray in this test
    error = capsys.readouterr().err
    assert f"job 'j' is already running with storage {storage}" in " ".join(error.split())
    assert f"process {process.pid}" in error
    with exclusive_run(storage, "j-other"):  # another job on the same storage is fine
        pass

    os.kill(process.pid, signal.SIGKILL)  # dies holding it: the kernel drops its lock
    process.wait()
    with exclusive_run(storage, "j"):
        assert str(os.getpid()) in lock_file(storage, "j").read_text()
        refused = pytest.raises(JobBusyError, match="already running")
        with refused, exclusive_run(storage, "j"):  # also a second hold within one process
            pass


def test_a_sweep_and_its_job_lock_apart(tmp_path, write_job):
    storage = str(tmp_path / "runs")
    with exclusive_run(storage, "j"), exclusive_run(storage, "j-sweep", "sweep"):
        assert lock_file(storage, "j") != lock_file(storage, "j-sweep")


def test_a_job_name_ending_in_sweep_is_refused(write_job, capsys):
    job = write_job(yaml.safe_dump({"name": "foo-sweep"}))
    assert main(["plan", str(job)]) == 2
    assert "'foo-sweep' ends in '-sweep'" in capsys.readouterr().err
