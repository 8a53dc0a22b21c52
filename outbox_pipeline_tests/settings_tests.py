"""One typed configuration: every variable read and validated in one place, each listed in .env.example."""

import re
from pathlib import Path

import pytest

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.config.settings import RelaySettings, load_settings

ROOT = Path(__file__).resolve().parents[1]
# Variables that configure Dagster's own instance (dagster.yaml), not the project.
DAGSTER_INSTANCE_VARIABLES = {"DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"}


def variables() -> list[str]:
    return [str(field.validation_alias) for field in RelaySettings.model_fields.values()]


def test_env_example_lists_every_variable_and_no_other():
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert set(variables()) - listed == set()
    assert listed - set(variables()) - DAGSTER_INSTANCE_VARIABLES == set()


def test_no_module_reads_the_environment_but_settings():
    # Ops, sensors, resources and monitoring get their settings handed to them. The benchmarks set up
    # stores of their own; a component checks that the variables its YAML names are set; the scrubber
    # redacts whatever the secret variables hold now.
    allowed = {"settings.py", "component.py", "scrubbing.py", "sentry_setup.py"}
    readers = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "outbox_pipeline").rglob("*.py")
        if path.name not in allowed
        and "bench" not in path.relative_to(ROOT).parts
        and re.search(r"os\.environ|os\.getenv", path.read_text())
    ]
    assert readers == []


def test_defaults_need_nothing_installed(tmp_path):
    settings = load_settings({"OUTBOX_STATE_DIR": str(tmp_path)})
    assert settings.uses_embedded_postgres and settings.uses_chdb
    assert settings.clickhouse_url == f"chdb://{tmp_path.resolve() / 'clickhouse'}"
    assert settings.environment == "development"
    assert load_settings({"SENTRY_CONFIG_ENVIRONMENT": "prod"}).environment == "prod"
    assert load_settings({"SENTRY_CONFIG_ENVIRONMENT": "prod", "OUTBOX_ENVIRONMENT": "eu"}).environment == "eu"


def test_empty_values_count_as_unset():
    assert load_settings({"OUTBOX_BATCH_SIZE": "", "SENTRY_CONFIG_DSN": ""}).batch_size == 100_000


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OUTBOX_BATCH_SIZE": "lots"}, "OUTBOX_BATCH_SIZE='lots': Input should be a valid integer"),
        ({"OUTBOX_LEASE_SECONDS": "0"}, "OUTBOX_LEASE_SECONDS='0': Input should be greater than or equal to 0.1"),
        ({"OUTBOX_SENSOR_ENABLED": "maybe"}, "OUTBOX_SENSOR_ENABLED='maybe': Input should be a valid boolean"),
        ({"OUTBOX_SCHEDULE_CRON": "every minute"}, "OUTBOX_SCHEDULE_CRON='every minute' is not a cron expression"),
        ({"OUTBOX_CLEANUP_CRON": "61 * * * *"}, "OUTBOX_CLEANUP_CRON='61 \\* \\* \\* \\*' is not a cron expression"),
        ({"OUTBOX_REPLAY_START_DATE": "soon"}, "OUTBOX_REPLAY_START_DATE='soon': Input should be a valid date"),
        ({"OUTBOX_DATABASE_URL": "mysql://db/app"}, "OUTBOX_DATABASE_URL must start with postgresql://"),
        ({"CLICKHOUSE_URL": "chdb://relative"}, "CLICKHOUSE_URL must name an absolute path"),
        ({"OUTBOX_FRESHNESS_MAX_LAG_SECONDS": "-1"}, "OUTBOX_FRESHNESS_MAX_LAG_SECONDS='-1': Input should be greater than 0"),
    ],
)
def test_a_bad_value_gets_one_line_naming_its_variable(environ, message):
    with pytest.raises(ConfigurationError, match=message) as raised:
        load_settings(environ)
    assert "\n" not in str(raised.value)


def test_a_url_with_a_password_is_not_echoed_in_the_error():
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"OUTBOX_DATABASE_URL": "postgresql://app:s3cret@db:notaport/app"})
    assert "s3cret" not in str(raised.value)


def test_two_bad_values_are_both_named():
    with pytest.raises(ConfigurationError) as raised:
        load_settings({"OUTBOX_BATCH_SIZE": "x", "OUTBOX_RETENTION_DAYS": "0"})
    assert "OUTBOX_BATCH_SIZE" in str(raised.value) and "OUTBOX_RETENTION_DAYS" in str(raised.value)
