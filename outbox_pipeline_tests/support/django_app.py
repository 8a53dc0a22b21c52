"""A Django application publishing events, configured in this test process (pytest plugin).

Django's settings can be configured once per process, so one fixture configures them
for the whole session: ``django_outbox_url`` is the URL of a database of its own with
the outbox tables, which ``django.db.connection`` uses. Tests look only at the event
ids they published. The application's URLs are in django_urls.py.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from outbox_pipeline.stores.outbox_store import OutboxStore


@pytest.fixture(scope="session")
def django_outbox_url(postgres_server_url):
    pytest.importorskip("django")
    import django
    from django.conf import settings
    from django.db import connections

    from outbox_pipeline_tests.conftest import with_database

    name = f"outbox_django_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(postgres_server_url, name)
    store = OutboxStore.connect(url)
    store.migrate()
    store.close()
    parts = psycopg.conninfo.conninfo_to_dict(url)
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": parts["dbname"],
                "USER": parts.get("user", ""),
                "PASSWORD": parts.get("password", ""),
                "HOST": parts.get("host", ""),
                "PORT": parts.get("port", ""),
            }
        },
        USE_TZ=True,
        ROOT_URLCONF="outbox_pipeline_tests.support.django_urls",
        ALLOWED_HOSTS=["testserver"],
        MIDDLEWARE=[],
        # Django's logging set-up would replace the handlers of every logger in this process.
        LOGGING_CONFIG=None,
    )
    django.setup()
    yield url
    connections.close_all()
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
