"""Which relay a store works for: a name and the event types it delivers.

Several relays can read one outbox, each into its own destination. Each has its
own cursor, batches, leases and failures in the outbox database, under its name.
Event types are chosen with glob patterns (``order_*``, ``user_created``; ``*``
any run of characters, ``?`` one character); no pattern means every type. They
are evaluated in PostgreSQL as LIKE patterns, so ``%``, ``_`` and ``\\`` in a type
name are escaped and match only themselves.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from outbox_pipeline.config.errors import ConfigurationError

DEFAULT_RELAY_NAME = "default"
# Relay names appear in Dagster job names and deduplication tokens: keep them plain.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_LIKE_ESCAPES = {"\\": "\\\\", "%": "\\%", "_": "\\_", "*": "%", "?": "_"}


def glob_to_like(pattern: str) -> str:
    """``order_*`` -> ``order\\_%``: a LIKE pattern (default escape character ``\\``) matching what the glob matches."""
    return "".join(_LIKE_ESCAPES.get(char, char) for char in pattern)


@dataclasses.dataclass(frozen=True)
class RelayIdentity:
    name: str = DEFAULT_RELAY_NAME
    event_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigurationError(
                f"relay name {self.name!r} is not valid: use 1 to 63 letters, digits and underscores, not starting with a digit"
            )
        if isinstance(self.event_types, str) or not isinstance(self.event_types, Sequence):
            raise ConfigurationError(
                f"event types of relay {self.name!r} must be a list of patterns such as ['order_*'], not {self.event_types!r}"
            )
        for pattern in self.event_types:
            if not isinstance(pattern, str) or not pattern:
                raise ConfigurationError(f"event type pattern {pattern!r} of relay {self.name!r} is empty or not text")
            if any(char.isspace() for char in pattern):
                raise ConfigurationError(f"event type pattern {pattern!r} of relay {self.name!r} has whitespace; event types have none")
        # In order, without repeats; "*" takes every type, which is the same as no filter.
        patterns = tuple(dict.fromkeys(self.event_types))
        object.__setattr__(self, "event_types", () if "*" in patterns else patterns)

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_RELAY_NAME

    @property
    def like_patterns(self) -> tuple[str, ...]:
        """What PostgreSQL evaluates (``event_type LIKE ANY (...)``); empty for every type."""
        return tuple(glob_to_like(pattern) for pattern in self.event_types)


DEFAULT_RELAY = RelayIdentity()
