"""Which event classes a deployment registers for typed tables.

A registration is a module path (every ``OutboxEvent`` subclass defined in that
module) or ``module:ClassName`` (that class alone), given in the setting
``OUTBOX_EVENT_CLASSES`` (comma-separated) or a relay component's ``event_classes``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence

from outbox_pipeline.config.errors import ConfigurationError, one_line
from outbox_pipeline.producer.events import OutboxEvent


def load_event_classes(paths: Sequence[str], where: str = "OUTBOX_EVENT_CLASSES") -> tuple[type[OutboxEvent], ...]:
    """The classes of ``paths``, in order, each once; ConfigurationError naming ``where`` otherwise."""
    found: list[type[OutboxEvent]] = []
    for path in paths:
        module_name, _, class_name = path.strip().partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigurationError(
                f"{where}: cannot import {module_name!r} ({type(exc).__name__}: {one_line(exc, 200)}); "
                "give a module path importable by the code location, as in myapp.events or myapp.events:OrderPaid"
            ) from None
        if class_name:
            event_class = getattr(module, class_name, None)
            if not (inspect.isclass(event_class) and issubclass(event_class, OutboxEvent)):
                raise ConfigurationError(f"{where}: {path!r} is not an OutboxEvent subclass; check the class name")
            classes = [event_class]
        else:
            classes = [
                member for _, member in inspect.getmembers(module, inspect.isclass)
                if issubclass(member, OutboxEvent) and member is not OutboxEvent and member.__module__ == module.__name__
            ]
            if not classes:
                raise ConfigurationError(f"{where}: module {module_name!r} defines no OutboxEvent subclass")
        found += [event_class for event_class in classes if event_class not in found]
    return tuple(found)
