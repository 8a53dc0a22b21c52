"""The steady state of the real stack: what a continuous stream costs under `dagster dev`.

    python -m outbox_pipeline.bench --steady --rate 50 --rate 1000 [--warmup 60 --measure 240 --idle 60] [--baseline]

For each rate (and, with ``--baseline``, for each mode: the default, where one run
follows the stream, and relay runs that end with their backlog, as the first
release's did), on fresh stores in a temporary directory:

1. the embedded PostgreSQL is started (``outbox-pipeline start``) and initialised,
   and ``dagster dev`` (webserver, daemon, code server, the default run launcher)
   runs with a fresh ``DAGSTER_HOME`` holding this project's ``dagster.yaml``;
2. **idle**: the CPU of the whole stack while nothing is published;
3. a producer commits ``rate`` events per second (10 per transaction, each
   ``event_date_time`` stamped just before its commit); after ``warmup`` seconds,
   **measured** for ``measure`` seconds: the CPU of the stack, the runs started,
   the event_log materializations, the growth of ``DAGSTER_HOME``;
4. the producer stops; once every event is in ClickHouse, the commit-to-ClickHouse
   latency of the events of the measured window (``loaded_at - event_date_time``)
   and ``count() == uniqExact(event_id) == published``.

CPU is the sum of user and system time of every process of the stack, the
embedded PostgreSQL included, and of their children that ended, per wall second
(cores); the PostgreSQL backend that serves the producer is the producer's cost,
not the stack's, and is left out (its figure is printed apart). Everything started
is stopped at the end: ``dagster dev``'s process group, any process left with this
run's state directory in its environment, and the embedded PostgreSQL by its pid.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from outbox_pipeline.bench.latency import produce
from outbox_pipeline.stores.clickhouse_connection import clickhouse_client
from outbox_pipeline.stores.embedded_postgres import running_embedded_postgres_url

BIN = Path(sys.executable).parent
PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENVIRONMENT = "steady-bench"
WORKSPACE = """load_from:
  - python_module:
      module_name: outbox_pipeline.definitions
      attribute: defs
      location_name: outbox_pipeline
"""
LOCATION_QUERY = '{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }'
MODES = {
    "following": {},
    # As the first release ran: every relay run ends with its backlog, the sensor starts the next.
    "baseline": {"OUTBOX_FOLLOW_SECONDS": "0"},
}


@dataclasses.dataclass
class SteadyResult:
    mode: str
    rate: float
    idle_cores: float = 0.0
    stream_cores: float = 0.0
    producer_backend_cores: float = 0.0
    runs_per_hour: float = 0.0
    runs_by_job: dict[str, int] = dataclasses.field(default_factory=dict)  # the runs started in the window
    materializations_per_hour: float = 0.0
    storage_mb_per_hour: float = 0.0
    latency: tuple[float, float, float] = (0.0, 0.0, 0.0)
    published: int = 0
    rows: int = 0
    distinct: int = 0

    @property
    def cores_above_idle(self) -> float:
        return self.stream_cores - self.idle_cores


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _directory_bytes(path: Path) -> int:
    total = 0
    for file in path.rglob("*"):
        with contextlib.suppress(OSError):
            if file.is_file() and not file.is_symlink():
                total += file.stat().st_size
    return total


class StackCpu:
    """CPU seconds of every process whose environment names the stack's state directory."""

    def __init__(self, state_dir: Path):
        self.marker = f"OUTBOX_STATE_DIR={state_dir}".encode()

    def _ours(self, pid: int) -> bool:
        try:
            return self.marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False

    def pids(self) -> list[int]:
        return [pid for pid in psutil.pids() if pid != os.getpid() and self._ours(pid)]

    def seconds(self, exclude: int | None = None) -> float:
        """Own and reaped children's CPU of every live process of the stack (a reaped child counts in its parent)."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                if pid == exclude:
                    continue
                total += times.user + times.system + times.children_user + times.children_system
        return total

    @staticmethod
    def of(pid: int) -> float:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            return times.user + times.system
        return 0.0


class Stack:
    """``dagster dev`` on fresh embedded stores, in ``workdir``; stopped (everything) by ``stop``."""

    def __init__(self, workdir: Path, extra_env: dict[str, str], workspace: str = WORKSPACE):
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.home = workdir / "dagster_home"
        self.state_dir.mkdir(parents=True)
        self.state_dir.chmod(0o755)  # the embedded PostgreSQL may run as a user of its own
        self.home.mkdir()
        shutil.copy(PROJECT_ROOT / "dagster.yaml", self.home / "dagster.yaml")
        (workdir / "workspace.yaml").write_text(workspace)
        inherited = {
            key: value for key, value in os.environ.items()
            if not key.startswith(("OUTBOX_", "CLICKHOUSE_", "DAGSTER_", "SENTRY_", "PG")) and key != "DEBUG"
        }
        self.env = {
            **inherited, "DAGSTER_HOME": str(self.home), "OUTBOX_STATE_DIR": str(self.state_dir),
            "OUTBOX_ENVIRONMENT": ENVIRONMENT, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra_env,
        }
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.cpu = StackCpu(self.state_dir)

    def _command(self, *args: str) -> str:
        result = subprocess.run([str(BIN / "outbox-pipeline"), *args], env=self.env, capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            raise RuntimeError(f"outbox-pipeline {' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
        return result.stdout

    def start(self, prepare: Callable[[Stack], None] | None = None) -> None:
        """Stores, then ``prepare(self)`` (which may add to ``env``), then ``dagster dev``."""
        self._command("start")
        self._command("init")
        if prepare is not None:
            prepare(self)
        log = (self.workdir / "dagster-dev.log").open("wb")
        self.process = subprocess.Popen(
            [str(BIN / "dagster"), "dev", "-w", str(self.workdir / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=self.home, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while not self._loaded():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dagster dev did not load the code location; see {self.workdir / 'dagster-dev.log'}")
            time.sleep(1)

    def _loaded(self) -> bool:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/graphql", data=json.dumps({"query": LOCATION_QUERY}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                entries = json.load(response)["data"]["workspaceOrError"]["locationEntries"]
        except (OSError, urllib.error.URLError, KeyError, TypeError, ValueError):
            return False
        return bool(entries) and all(entry["loadStatus"] == "LOADED" for entry in entries)

    @property
    def database_url(self) -> str:
        url = running_embedded_postgres_url(self.state_dir / "postgres")
        if url is None:
            raise RuntimeError("the embedded PostgreSQL server is not running")
        return url

    @property
    def clickhouse_url(self) -> str:
        return self.env.get("CLICKHOUSE_URL") or f"chdb://{self.state_dir / 'clickhouse'}"

    def instance(self):
        import dagster as dg

        return dg.DagsterInstance.from_config(str(self.home))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)  # dagster dev stops its services and runs
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        for pid in self.cpu.pids():  # a run worker still finishing, say; the embedded PostgreSQL is stopped below
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).name() != "postgres":
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._command("stop")  # by the pid in postmaster.pid


def counts(clickhouse_url: str, table: str = "event_log") -> tuple[int, int]:
    with clickhouse_client(clickhouse_url, busy_wait_seconds=120) as client:
        rows, distinct = client.query(f"SELECT count(), uniqExact(event_id) FROM {table}").result_rows[0]
    return int(rows), int(distinct)


def latency(clickhouse_url: str, start: dt.datetime, end: dt.datetime, table: str = "event_log") -> tuple[float, float, float, float]:
    """p50, p95, p99 and max of commit-to-ClickHouse of the events of [start, end), in seconds."""
    with clickhouse_client(clickhouse_url, busy_wait_seconds=120) as client:
        p50, p95, p99, worst = client.query(
            "SELECT quantileExact(0.5)(d), quantileExact(0.95)(d), quantileExact(0.99)(d), max(d) FROM "
            f"(SELECT dateDiff('microsecond', event_date_time, loaded_at) / 1e6 AS d FROM {table} "
            "WHERE event_date_time >= {start:DateTime64(6, 'UTC')} AND event_date_time < {end:DateTime64(6, 'UTC')})",
            parameters={"start": start, "end": end},
        ).result_rows[0]
    return float(p50), float(p95), float(p99), float(worst)


def measure_steady(mode: str, rate: float, *, warmup: float, measure: float, idle: float, log=print) -> SteadyResult:
    import dagster as dg

    result = SteadyResult(mode, rate)
    workdir = Path(tempfile.mkdtemp(prefix="outbox-steady-"))
    stack = Stack(workdir, MODES[mode])
    stop, counter, producer_info = threading.Event(), [0], {}
    producer: threading.Thread | None = None
    try:
        log(f"{mode}, {rate:g} events/s: starting dagster dev in {workdir}")
        stack.start()
        # Idle: the stack with nothing to do (sensor ticks, daemon, webserver).
        before, started = stack.cpu.seconds(), time.monotonic()
        time.sleep(idle)
        result.idle_cores = (stack.cpu.seconds() - before) / (time.monotonic() - started)

        log(f"{mode}, {rate:g} events/s: producing; warm-up {warmup:g} s, then measuring {measure:g} s")
        producer = threading.Thread(target=produce, args=(stack.database_url, ENVIRONMENT, rate, stop, counter, producer_info), daemon=True)
        producer.start()
        time.sleep(warmup)
        backend = producer_info.get("backend_pid")
        window_start = dt.datetime.now(dt.UTC)
        cpu_before, backend_before, started = stack.cpu.seconds(exclude=backend), StackCpu.of(backend), time.monotonic()
        storage_before = _directory_bytes(stack.home)
        time.sleep(measure)
        elapsed = time.monotonic() - started
        result.stream_cores = (stack.cpu.seconds(exclude=backend) - cpu_before) / elapsed
        result.producer_backend_cores = (StackCpu.of(backend) - backend_before) / elapsed
        result.storage_mb_per_hour = (_directory_bytes(stack.home) - storage_before) / 2**20 * 3600 / elapsed
        window_end = dt.datetime.now(dt.UTC)
        instance = stack.instance()
        try:
            runs = instance.get_run_records(dg.RunsFilter(created_after=window_start, created_before=window_end))
            result.runs_per_hour = len(runs) * 3600 / elapsed
            result.runs_by_job = dict(collections.Counter(record.dagster_run.job_name for record in runs))
            materializations = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("event_log"), after_timestamp=window_start.timestamp(),
                                      before_timestamp=window_end.timestamp()),
                limit=10_000,
            ).records
            result.materializations_per_hour = len(materializations) * 3600 / elapsed
        finally:
            instance.dispose()

        stop.set()
        producer.join(timeout=60)
        result.published = counter[0]
        log(f"{mode}, {rate:g} events/s: {result.published} events published; waiting for all of them in ClickHouse")
        deadline = time.monotonic() + 300
        while True:
            result.rows, result.distinct = counts(stack.clickhouse_url)
            if result.rows >= result.published or time.monotonic() > deadline:
                break
            time.sleep(10)
        result.latency = latency(stack.clickhouse_url, window_start, window_end)[:3]
    finally:
        stop.set()
        if producer is not None:
            producer.join(timeout=60)
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def print_columns(header: list[str], lines: list[tuple[str, Callable]], results: list, min_cell: int = 18) -> None:
    """One row a figure, one column a measured case, side by side."""
    width = max(len(label) for label, _ in lines)
    cell = max(min_cell, *(len(h) for h in header))
    print(f"{'':<{width}}  " + "  ".join(f"{h:>{cell}}" for h in header))
    for label, value in lines:
        print(f"{label:<{width}}  " + "  ".join(f"{value(r):>{cell}}" for r in results))


def print_steady(results: list[SteadyResult]) -> None:
    header = [f"{r.rate:g}/s {r.mode}" for r in results]
    lines = [
        ("cores, idle stack", lambda r: f"{r.idle_cores:.3f}"),
        ("cores, with the stream", lambda r: f"{r.stream_cores:.3f}"),
        ("cores above idle", lambda r: f"{r.cores_above_idle:.3f}"),
        ("(producer's PostgreSQL backend, left out)", lambda r: f"{r.producer_backend_cores:.3f}"),
        ("runs started per hour", lambda r: f"{r.runs_per_hour:,.0f}"),
        ("event_log materializations per hour", lambda r: f"{r.materializations_per_hour:,.0f}"),
        ("DAGSTER_HOME growth, MB per hour", lambda r: f"{r.storage_mb_per_hour:,.1f}"),
        ("latency commit -> ClickHouse p50, s", lambda r: f"{r.latency[0]:.2f}"),
        ("latency p95, s", lambda r: f"{r.latency[1]:.2f}"),
        ("latency p99, s", lambda r: f"{r.latency[2]:.2f}"),
        ("published / count() / uniqExact(event_id)", lambda r: f"{r.published:,}/{r.rows:,}/{r.distinct:,}"),
        ("exactly once", lambda r: "yes" if r.published == r.rows == r.distinct else "NO"),
    ]
    print_columns(header, lines, results)
    for header_cell, r in zip(header, results):
        print(f"runs started in the measured window, {header_cell}: {_by_job(r.runs_by_job)}")


def _by_job(runs_by_job: dict[str, int]) -> str:
    return ", ".join(f"{job} {count}" for job, count in sorted(runs_by_job.items())) or "none"


def run_steady(rates: list[float], *, warmup: float, measure: float, idle: float, baseline: bool) -> list[SteadyResult]:
    modes = ["following", "baseline"] if baseline else ["following"]
    results = []
    for rate in rates:
        for mode in modes:
            results.append(measure_steady(mode, rate, warmup=warmup, measure=measure, idle=idle,
                                          log=lambda message: print(message, file=sys.stderr, flush=True)))
    print_steady(results)
    return results
