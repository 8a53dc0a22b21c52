"""MkDocs hook: renders the settings model into the pages, so the documented variables cannot drift.

A page line ``<!-- settings: RelaySettings -->`` becomes a table of every variable of that class of
``outbox_pipeline.config.settings`` (environment name, type, default, description), in the order the
class declares them. Names after the class keep the variables starting with one of them:
``<!-- settings: RelaySettings SENTRY_ DEBUG -->``. An unknown class, a marker that matches nothing, or
a variable without a description fails the build (``mkdocs build --strict`` stops on the warning).
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import re
import sys
import types
from pathlib import Path

# The settings of the checkout being built, not of an installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
settings_module = importlib.import_module("outbox_pipeline.config.settings")

log = logging.getLogger("mkdocs.hooks.settings_tables")

MARKER = re.compile(r"^<!-- settings: (\w+)((?: [A-Z0-9_]+)*) -->$", re.M)
TYPE_NAMES = {str: "text", int: "integer", float: "number", bool: "boolean", Path: "path", dt.date: "date"}


def type_name(annotation: object) -> str:
    if isinstance(annotation, types.UnionType):  # `str | None`: an optional text
        return " or ".join(type_name(arg) for arg in annotation.__args__ if arg is not type(None))
    return TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def default_text(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def settings_table(class_name: str, prefixes: tuple[str, ...], page: str) -> str:
    model = getattr(settings_module, class_name, None)
    if model is None or not hasattr(model, "model_fields"):
        log.warning("%s: no settings class %s in outbox_pipeline.config.settings", page, class_name)
        return ""
    rows = ["| Variable | Type | Default | Description |", "|---|---|---|---|"]
    for field in model.model_fields.values():
        name = str(field.validation_alias)
        if prefixes and not name.startswith(prefixes):
            continue
        if not field.description:
            log.warning("%s: %s.%s has no description: add Field(description=...)", page, class_name, name)
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {type_name(field.annotation)} | {default_text(field.default)} | {description} |")
    if len(rows) == 2:
        log.warning("%s: no variable of %s starts with %s", page, class_name, " or ".join(prefixes))
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    source = page.file.src_uri
    return MARKER.sub(lambda match: settings_table(match[1], tuple(match[2].split()), source), markdown)
