"""A fleet under `dagster dev`: N relays beside one relay at the same total rate, measured in the same run.

    python -m outbox_pipeline.bench --steady --relays 12 --rate 10 [--warmup 60 --measure 600 --idle 60] [--clickhouse-http]

Two stacks, one after the other, each on fresh stores (see steady.py for what is measured and how):

* **one relay**: the default relay alone, its producer at ``relays × rate`` events per second;
* **N relays**: the default relay and N-1 ``OutboxRelay`` components (``r01``, ``r02``, …), every
  second one reading a second outbox database, each with a producer of its own event type
  at ``rate`` events per second. The default relay takes its own type (and, having no
  filter, every other type of its outbox too, as a default relay does).

With ``--clickhouse-http`` ClickHouse is the test suite's chDB-backed HTTP server in a process
of its own, so run workers behave as they would against a server; otherwise chDB.

Besides the steady figures: the run workers resident at the same time (sampled every 2 s),
their RSS in total, and each relay's commit-to-ClickHouse latency (p95 and max; the worst
relay is printed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import psutil
import psycopg

from outbox_pipeline.bench.latency import produce
from outbox_pipeline.bench.steady import ENVIRONMENT, PROJECT_ROOT, Stack, StackCpu, _directory_bytes, counts, latency, print_columns

SECOND_OUTBOX_VARIABLE = "OUTBOX_BENCH_SECOND_DATABASE_URL"
LOCATION_MODULE = '''"""The benchmark's code location: the default relay and {components} OutboxRelay components."""

from outbox_pipeline.bench.fleet import fleet_definitions

defs = fleet_definitions({relays})
'''
WORKSPACE = """load_from:
  - python_file:
      relative_path: fleet_location.py
      attribute: defs
      location_name: outbox_pipeline
      working_directory: {workdir}
"""


def relay_name(index: int) -> str:
    return "default" if index == 0 else f"r{index:02d}"


def fleet_definitions(relays: int):
    """The code location of a fleet of ``relays`` (see the module's doc)."""
    import dagster as dg
    import yaml

    from outbox_pipeline.config.settings import code_location_settings
    from outbox_pipeline.definitions import build_defs
    from outbox_pipeline.orchestration.component import OutboxRelay

    components = []
    for index in range(1, relays):
        name = relay_name(index)
        attributes = {"name": name, "table": f"{name}_event_log", "event_types": [f"fleet_{name}"]}
        if index % 2 == 0:
            attributes["outbox_database_url"] = f"{{{{ env.{SECOND_OUTBOX_VARIABLE} }}}}"
        components.append(dg.build_defs_for_component(OutboxRelay.resolve_from_yaml(yaml.safe_dump(attributes))))
    return build_defs(code_location_settings(), with_defs_folder=False, components=components)


@dataclasses.dataclass
class FleetResult:
    relays: int
    rate: float  # events per second in total
    idle_cores: float = 0.0
    stream_cores: float = 0.0
    runs_per_hour: float = 0.0
    storage_mb_per_hour: float = 0.0
    max_run_workers: int = 0
    max_run_worker_rss_mb: float = 0.0
    worst_p95: tuple[str, float] = ("", 0.0)
    worst_max: tuple[str, float] = ("", 0.0)
    exactly_once: bool = True
    published: int = 0

    @property
    def cores_above_idle(self) -> float:
        return self.stream_cores - self.idle_cores


class RunWorkers(threading.Thread):
    """Samples the stack's run workers every ``every`` seconds: their number and their RSS in total."""

    def __init__(self, cpu: StackCpu, every: float = 2.0):
        super().__init__(daemon=True)
        self.cpu, self.every = cpu, every
        self.stop = threading.Event()
        self.max_count, self.max_rss = 0, 0

    def run(self) -> None:
        while not self.stop.wait(self.every):
            count, rss = 0, 0
            for pid in self.cpu.pids():
                with contextlib.suppress(psutil.Error):
                    process = psutil.Process(pid)
                    # The code server starts each run worker as a multiprocessing child ("dagster api execute_run" elsewhere).
                    if any(mark in " ".join(process.cmdline()) for mark in ("multiprocessing.spawn", "execute_run")):
                        count += 1
                        rss += process.memory_info().rss
            self.max_count, self.max_rss = max(self.max_count, count), max(self.max_rss, rss)


@contextlib.contextmanager
def clickhouse_http_server(path: Path):
    """The test suite's chDB-backed HTTP server in a process of its own; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "outbox_pipeline_tests.support.clickhouse_http_server", "--path", str(path), "--stop-on-stdin-eof"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT,
    )
    try:
        line = process.stdout.readline().strip()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"the ClickHouse HTTP server did not start: {line!r}")
        yield f"http://default:@{line.split()[1]}/default"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _second_outbox(stack: Stack) -> None:
    url = stack.database_url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE outbox_b")
    second = urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path="/outbox_b"))
    stack.env[SECOND_OUTBOX_VARIABLE] = second
    init = subprocess.run([str(Path(sys.executable).parent / "outbox-pipeline"), "init"], env={**stack.env, "OUTBOX_DATABASE_URL": second},
                          capture_output=True, text=True, timeout=180)
    if init.returncode != 0:
        raise RuntimeError(f"outbox-pipeline init of the second outbox failed: {init.stderr.strip()[-2000:]}")


def measure_fleet(relays: int, rate: float, *, warmup: float, measure: float, idle: float, http: bool, log) -> FleetResult:
    """``relays`` relays, each with a producer of ``rate`` events/s (one relay: a single producer at the same total)."""
    import dagster as dg

    total = relays * rate
    result = FleetResult(relays, total)
    workdir = Path(tempfile.mkdtemp(prefix="outbox-fleet-"))
    workdir.chmod(0o755)
    (workdir / "fleet_location.py").write_text(LOCATION_MODULE.format(components=relays - 1, relays=relays))
    stop, producers, counters = threading.Event(), [], []
    with contextlib.ExitStack() as cleanup:
        extra = {"CLICKHOUSE_URL": cleanup.enter_context(clickhouse_http_server(workdir / "clickhouse-http"))} if http else {}
        stack = Stack(workdir, extra, workspace=WORKSPACE.format(workdir=workdir))
        cleanup.callback(shutil.rmtree, workdir, True)
        cleanup.callback(stack.stop)
        log(f"{relays} relays, {total:g} events/s in all: starting dagster dev in {workdir}")
        stack.start(prepare=_second_outbox)
        before, started = stack.cpu.seconds(), time.monotonic()
        time.sleep(idle)
        result.idle_cores = (stack.cpu.seconds() - before) / (time.monotonic() - started)

        second = stack.env[SECOND_OUTBOX_VARIABLE]
        for index in range(relays):
            # As fleet_definitions reads them: r02, r04, ... from the second outbox, the rest from the first.
            url = second if index and index % 2 == 0 else stack.database_url
            counter = [0]
            thread = threading.Thread(
                target=produce, args=(url, ENVIRONMENT, rate, stop, counter, None, f"fleet_{relay_name(index)}"), daemon=True
            )
            thread.start()
            producers.append(thread)
            counters.append(counter)
        cleanup.callback(stop.set)
        time.sleep(warmup)
        workers = RunWorkers(stack.cpu)
        workers.start()
        window_start = dt.datetime.now(dt.UTC)
        cpu_before, storage_before, started = stack.cpu.seconds(), _directory_bytes(stack.home), time.monotonic()
        time.sleep(measure)
        elapsed = time.monotonic() - started
        # The producers' PostgreSQL backends are in the stack's count here: the one-relay run has them too.
        result.stream_cores = (stack.cpu.seconds() - cpu_before) / elapsed
        result.storage_mb_per_hour = (_directory_bytes(stack.home) - storage_before) / 2**20 * 3600 / elapsed
        window_end = dt.datetime.now(dt.UTC)
        workers.stop.set()
        workers.join()
        result.max_run_workers, result.max_run_worker_rss_mb = workers.max_count, workers.max_rss / 2**20
        instance = stack.instance()
        try:
            runs = instance.get_run_records(dg.RunsFilter(created_after=window_start, created_before=window_end))
            result.runs_per_hour = len(runs) * 3600 / elapsed
        finally:
            instance.dispose()
        stop.set()
        for thread in producers:
            thread.join(timeout=60)
        result.published = sum(counter[0] for counter in counters)
        log(f"{relays} relays: {result.published} events published; waiting for all of them in ClickHouse")
        _wait_and_read(stack, relays, counters, window_start, window_end, result)
    return result


def _wait_and_read(stack: Stack, relays: int, counters: list, window_start, window_end, result: FleetResult) -> None:
    # The default relay takes every type of the first outbox: its own producer's and those of r01, r03, ...
    expected = {"default": counters[0][0] + sum(counters[index][0] for index in range(1, relays, 2))}
    expected.update({relay_name(index): counters[index][0] for index in range(1, relays)})
    deadline = time.monotonic() + 300
    for name, published in expected.items():
        table = "event_log" if name == "default" else f"{name}_event_log"
        while counts(stack.clickhouse_url, table)[0] < published and time.monotonic() < deadline:
            time.sleep(5)
        rows, distinct = counts(stack.clickhouse_url, table)
        result.exactly_once &= rows == distinct == published
        _, p95, _, worst = latency(stack.clickhouse_url, window_start, window_end, table)
        if p95 >= result.worst_p95[1]:
            result.worst_p95 = (name, p95)
        if worst >= result.worst_max[1]:
            result.worst_max = (name, worst)


def print_fleet(results: list[FleetResult]) -> None:
    header = [f"{r.relays} relay{'s' if r.relays > 1 else ''}, {r.rate:g}/s" for r in results]
    lines = [
        ("cores, idle stack", lambda r: f"{r.idle_cores:.3f}"),
        ("cores above idle", lambda r: f"{r.cores_above_idle:.3f}"),
        ("runs started per hour", lambda r: f"{r.runs_per_hour:,.0f}"),
        ("DAGSTER_HOME growth, MB per hour", lambda r: f"{r.storage_mb_per_hour:,.1f}"),
        ("run workers resident at once (max)", lambda r: f"{r.max_run_workers}"),
        ("their RSS in total (max), MB", lambda r: f"{r.max_run_worker_rss_mb:,.0f}"),
        ("worst relay's latency p95, s", lambda r: f"{r.worst_p95[1]:.2f} ({r.worst_p95[0]})"),
        ("worst relay's latency max, s", lambda r: f"{r.worst_max[1]:.2f} ({r.worst_max[0]})"),
        ("events published", lambda r: f"{r.published:,}"),
        ("exactly once in every table", lambda r: "yes" if r.exactly_once else "NO"),
    ]
    print_columns(header, lines, results, min_cell=22)


def run_fleet_bench(relays: int, rate: float, *, warmup: float, measure: float, idle: float, http: bool) -> list[FleetResult]:
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    os.environ.pop("OUTBOX_DATABASE_URL", None)  # each stack brings its own stores
    results = [
        measure_fleet(1, relays * rate, warmup=warmup, measure=measure, idle=idle, http=http, log=log),
        measure_fleet(relays, rate, warmup=warmup, measure=measure, idle=idle, http=http, log=log),
    ]
    print_fleet(results)
    return results
