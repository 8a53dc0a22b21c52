"""A Django application publishing events, configured in this test process (pytest plugin).

Django's settings can be configured once per process, so one fixture configures them
for the whole session: ``django_outbox_url`` is the URL of a database of its own with
the outbox tables, which ``django.db.connection`` uses. Tests look only at the event
ids they published. The application's URLs are in django_urls.py.
"""

from __future__ import annotations

import psycopg
import pytest


@pytest.fixture(scope="session")
def django_outbox_url(postgres_server_url):
    pytest.importorskip("django")
    import django
    from django.conf import settings
    from django.db import connections

    from outbox_pipeline_tests.conftest import new_database

    with new_database(postgres_server_url, "outbox_django", migrated=True) as url:
        yield from _configured_django(django, settings, connections, url)


def _configured_django(django, settings, connections, url: str):
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
