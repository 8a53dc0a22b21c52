"""Sentry in the processes that run project code: a run worker and the code server."""

import os
import subprocess
import sys
import textwrap

from outbox_pipeline_tests.monitoring.envelopes import check_ins, errors, trace, transactions
from outbox_pipeline_tests.support.relay_runs import publish_raw

RUN_WORKER = textwrap.dedent(
    """
    import os
    from outbox_pipeline_tests.support.relay_runs import run_relay

    result = run_relay(run_config={"batch_size": 10})
    # Skip interpreter shutdown (and the SDK's atexit flush): only what the
    # run itself flushed has left the process.
    os._exit(0 if result.success else 3)
    """
)


def test_run_worker_delivers_everything_before_it_exits(relay_env, outbox, recorder):
    publish_raw(relay_env["OUTBOX_DATABASE_URL"], 12)

    done = subprocess.run([sys.executable, "-c", RUN_WORKER], env=dict(os.environ), timeout=120)

    assert done.returncode == 0
    # Already received when the process ended: no waiting.
    [transaction] = transactions(recorder)
    assert trace(transaction)["status"] == "ok"
    assert trace(transaction)["data"]["events_processed"] == 12
    assert [c["status"] for c in check_ins(recorder)] == ["in_progress", "ok"]
    assert recorder.payloads("trace_metric")
    assert outbox.counts().pending == 0


CODE_SERVER = textwrap.dedent(
    """
    import sentry_sdk
    import outbox_pipeline.definitions  # what the code server imports

    assert sentry_sdk.get_client().is_active(), "Sentry did not start at import"
    sentry_sdk.capture_message("code server up")
    sentry_sdk.flush(timeout=5)
    """
)


def test_code_server_starts_sentry_when_it_imports_the_definitions(relay_env, recorder):
    done = subprocess.run([sys.executable, "-c", CODE_SERVER], env=dict(os.environ), timeout=120)

    assert done.returncode == 0
    [event] = errors(recorder)
    assert event["message"] == "code server up" or event["logentry"]["message"] == "code server up"
