"""The documentation site builds with no warning, its configuration pages come from the settings model,
and the README's links lead to pages and headings that exist."""

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pydantic
import pytest
from markdown.extensions.toc import slugify

from outbox_pipeline.config import settings

ROOT = Path(__file__).resolve().parents[1]
# On one worker under pytest-xdist: the module-scoped site is then built once, not once per worker.
pytestmark = pytest.mark.xdist_group("docs_site")
README_MAX_LINES = 250
# [text](target): relative links of the Markdown, not inside code.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def build(project: Path, site: Path) -> subprocess.CompletedProcess:
    """mkdocs build --strict of `project` into `site`, with this checkout's package importable by the hook."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(project / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    result = build(ROOT, site)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "WARNING" not in output, output[-4000:]
    return site


def test_the_site_builds_strictly_without_warnings(built_site):
    pages = {path.parent.name for path in built_site.glob("*/index.html")}
    assert {"quick-start", "configuration", "guarantees", "operating", "sentry", "benchmarks"} <= pages


def test_the_configuration_page_lists_every_setting_with_its_description(built_site):
    page = (built_site / "configuration" / "index.html").read_text()
    missing = [
        str(field.validation_alias)
        for field in settings.RelaySettings.model_fields.values()
        if f"<code>{field.validation_alias}</code>" not in page
    ]
    assert missing == []
    for field in settings.RelaySettings.model_fields.values():
        assert field.description, f"{field.validation_alias} has no description"


def test_a_broken_link_fails_the_build(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    with (project / "docs" / "index.md").open("a") as page:
        page.write("\nSee [the guarantees](guarantees.md#no-such-heading).\n")
    result = build(project, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-heading" in result.stdout + result.stderr


def load_hook():
    spec = importlib.util.spec_from_file_location("settings_tables", ROOT / "docs" / "hooks" / "settings_tables.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    return hook


def test_the_hook_warns_of_a_setting_without_description(monkeypatch, caplog):
    class Undescribed(pydantic.BaseModel):
        rate: float = pydantic.Field(2.0, validation_alias="OUTBOX_SOME_RATE")

    hook = load_hook()
    monkeypatch.setattr(hook.settings_module, "Undescribed", Undescribed, raising=False)
    with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.settings_tables"):
        table = hook.settings_table("Undescribed", (), "configuration.md")
    assert "| `OUTBOX_SOME_RATE` | number | `2` |  |" in table
    assert "OUTBOX_SOME_RATE has no description" in caplog.text


def markdown_outside_code(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


def headings(path: Path) -> set[str]:
    text = markdown_outside_code(path)
    return {slugify(re.sub(r"[`*]", "", title).strip(), "-") for title in re.findall(r"^#+ (.+)$", text, re.M)}


def test_the_readme_is_short_and_its_links_resolve():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES
    targets = [target for target in LINK.findall(markdown_outside_code(readme)) if not re.match(r"[a-z]+:", target)]
    assert any(target.startswith("docs/") for target in targets)
    broken = []
    for target in targets:
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else readme
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in headings(file):
            broken.append(f"{target}: no such heading")
    assert broken == []


def test_the_readme_example_publishes_what_the_readme_shows(monkeypatch, relay_env):
    """The README's Python example, run as written, against the test's database.

    The one substitution: the example asks for the URL of the server `scripts/dev` runs, which the
    suite does not start; it gets the test database's URL instead.
    """
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    shown = re.search(r"-- order_paid \| (\{.*?\}) \| development", readme).group(1)
    monkeypatch.setattr(
        "outbox_pipeline.stores.embedded_postgres.running_embedded_postgres_url", lambda _: relay_env["OUTBOX_DATABASE_URL"]
    )
    for name in ("OUTBOX_ENVIRONMENT", "SENTRY_CONFIG_ENVIRONMENT"):  # the README shows the default environment
        monkeypatch.delenv(name, raising=False)
    exec(compile(example, "README.md", "exec"), {"__name__": "readme_example"})
    with psycopg.connect(relay_env["OUTBOX_DATABASE_URL"]) as conn:
        rows = conn.execute("SELECT event_type, event_context, environment FROM outbox").fetchall()
    assert rows == [("order_paid", shown, "development")]
