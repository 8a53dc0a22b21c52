"""scripts/dev run as a developer runs it: a quiet start, and stopping it stops everything it started.

The script runs for real (demo producer, `dagster dev` with its webserver, daemon, code
server and run workers, the embedded PostgreSQL and chDB) on state directories of the
test's own, with the test's Python environment (OUTBOX_DEV_VENV) so nothing is installed.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest

from outbox_pipeline_tests.operations.dagster_dev_e2e_tests import (
    REPO_ROOT,
    Stack,
    default_signal_handling,
    embedded_postgres_pid,
    free_port,
    location_loaded,
    processes_started_for,
    stack_environment,
    stop_stack,
)

# One stack at a time, with dagster_dev_e2e_tests.py: the stop time below is measured, and another stack's start
# on the same two cores would be measured with it.
pytestmark = pytest.mark.xdist_group("dagster_dev_stack")

# Dagster's warning when DAGSTER_HOME is set and another folder's dagster.yaml is in the working directory.
UNUSED_DAGSTER_YAML_WARNING = "will not be used to configure Dagster"
# Ctrl-C stops everything within this (measured: 6-12 s on two shared cores under a load of 3-16, a run following the stream included).
STOP_WITHIN_SECONDS = 15


@pytest.fixture
def dev_dirs():
    # Not under pytest's temporary root (mode 0700): the embedded PostgreSQL runs as its own system user.
    state_dir = Path(tempfile.mkdtemp(prefix="outbox-dev-state-"))
    state_dir.chmod(0o755)
    home = Path(tempfile.mkdtemp(prefix="outbox-dev-home-"))
    yield state_dir, home
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


def describe(pids: list[int]) -> list[str]:
    described = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            described.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:200]}")
    return described


def started_in_the_background() -> None:
    """As a non-interactive shell starts `scripts/dev &` (CI, nohup, a process manager): SIGINT ignored, SIGTERM not."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# Alone: beside the guarantee, following and CLI tests on other workers, the stop took 15-17 s on two cores (7-8 s beside none).
@pytest.mark.alone
@pytest.mark.parametrize(
    ("stop_signal", "started_as"),
    [(signal.SIGTERM, default_signal_handling), (signal.SIGINT, default_signal_handling), (signal.SIGTERM, started_in_the_background)],
    ids=["SIGTERM", "SIGINT", "SIGTERM-started-in-the-background"],
)
def test_stopping_scripts_dev_stops_what_it_started(dev_dirs, stop_signal, started_as):
    state_dir, home = dev_dirs
    env = {
        **stack_environment(state_dir, home),
        "OUTBOX_DEV_VENV": sys.prefix,
        # The producer is still publishing when the script is stopped.
        "DEMO_EVENTS": "100000",
        "DEMO_RATE": "20",
    }
    port = free_port()
    log_path = home.with_name(home.name + ".log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(REPO_ROOT / "scripts" / "dev"), "-h", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal gives it
            preexec_fn=started_as,
        )
    stack = Stack(process, port, env, state_dir, log_path)
    try:
        stack.wait_for("the code location to load", lambda: location_loaded(stack), timeout=180)
        # Events flow: the sensor has launched a relay run through the daemon.
        stack.wait_for(
            "a relay run launched by the sensor, following",
            lambda: [run for run in stack.runs(pipelineName="follow_outbox_fleet") if run["status"] == "STARTED"],
            timeout=120,
        )
        postgres = embedded_postgres_pid(state_dir)
        assert postgres is not None and psutil.pid_exists(postgres)
        started = processes_started_for(state_dir)
        assert len(started) >= 5, describe(started)  # the script, the producer, dagster dev and its services, PostgreSQL

        stop_started = time.monotonic()
        os.killpg(process.pid, stop_signal)  # Ctrl-C in a terminal sends SIGINT to the whole group
        process.wait(timeout=180)
        stop_seconds = time.monotonic() - stop_started
        print(f"scripts/dev stopped in {stop_seconds:.1f} s after {stop_signal.name}")
        output = log_path.read_text(errors="replace")

        problems = []
        # The script returns once its process groups are empty and PostgreSQL has stopped (checked below).
        if stop_seconds > STOP_WITHIN_SECONDS:
            problems.append(f"scripts/dev took {stop_seconds:.1f} s to stop, more than {STOP_WITHIN_SECONDS} s")
        if psutil.pid_exists(postgres) or (state_dir / "postgres" / "postmaster.pid").exists():
            problems.append(f"the embedded PostgreSQL (pid {postgres}) is still running")
        if f"stopped the embedded PostgreSQL server in {state_dir / 'postgres'}" not in output:
            problems.append("scripts/dev did not say it stopped the embedded PostgreSQL")
        leftovers = [pid for pid in processes_started_for(state_dir) if pid != postgres]
        if leftovers:
            problems.append(f"processes left running: {describe(leftovers)}")
        if UNUSED_DAGSTER_YAML_WARNING in output:
            problems.append("Dagster warned that dagster.yaml is not used")
        # Stopping is not a failure: the following run ends as a success (no failed run, no Sentry issue).
        instance = dg.DagsterInstance.from_config(str(home))
        try:
            statuses = [run.status for run in instance.get_runs(dg.RunsFilter(job_name="follow_outbox_fleet"))]
        finally:
            instance.dispose()
        if not statuses or any(status != dg.DagsterRunStatus.SUCCESS for status in statuses):
            problems.append(f"the following runs ended as {statuses}, not as successes")
        assert problems == [], output[-4000:]
    finally:
        stop_stack(process, state_dir)  # only if something above failed: kills what is left, by pid
        print(f"\n--- scripts/dev output (tail) ---\n{stack.log_tail(3000)}")
        log_path.unlink(missing_ok=True)


def test_dg_comes_with_the_package_scripts_dev_installs():
    # scripts/dev installs the package alone (no test extras), and the docs send their users to `dg`.
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert any(dependency.startswith("dagster-dg-cli==") for dependency in project["dependencies"])
    assert "pip install --quiet -e .\n" in (REPO_ROOT / "scripts" / "dev").read_text()
