"""Redaction of credentials from anything that leaves the process for Sentry.

Connection strings travel in exception messages (psycopg, clickhouse-connect
and chDB quote the DSN they failed on), in log lines turned into breadcrumbs
and in span data, so scrubbing works on every string of an event rather than
on a list of known fields.

Four rules, applied in this order to every string:

1. exact values of configured secrets (see ``SECRET_ENV_VARS``) and the
   password / key parts inside them, wherever they occur as substrings;
2. ``scheme://user:PASSWORD@host`` for any scheme -> ``scheme://user:[Filtered]@host``;
3. ``http(s)://KEY@host`` (a Sentry DSN's public key, or a token used as
   user name) -> ``http(s)://[Filtered]@host``;
4. ``password=...`` / ``PGPASSWORD=...`` (libpq conninfo, query strings,
   shell env) and ``'password': '...'`` (dict reprs, JSON) -> value filtered.

Mapping values under password-like keys are filtered too, and selected keys
(e.g. the relay's ``event_context``) can be dropped entirely.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "FILTERED",
    "MIN_SECRET_LENGTH",
    "SECRET_ENV_VARS",
    "configured_secrets",
    "scrub",
    "scrub_text",
    "secret_parts",
]

FILTERED = "[Filtered]"

# Env vars whose current values are treated as secrets.
SECRET_ENV_VARS: tuple[str, ...] = (
    "OUTBOX_DATABASE_URL",
    "CLICKHOUSE_URL",
    "SENTRY_CONFIG_DSN",
)

# Exact-value replacement of very short strings (a one-letter dev password)
# would shred every message; such values are still caught by rules 2-4.
MIN_SECRET_LENGTH = 4

_PASSWORD_NAMES = r"pgpassword|password|passwd|pwd"
_PASSWORD_WORDS = r"(?:" + _PASSWORD_NAMES + r")"

# Rule 2. The password runs to the last '@' before whitespace or the path, so
# an unencoded '@' inside a password is still covered.
_URL_PASSWORD = re.compile(
    r"(?P<prefix>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/?#@]*:)(?P<secret>[^\s/?#]*)(?=@)"
)

# Rule 3. Only http(s): for database schemes the bare user name is not a secret.
_HTTP_USER_ONLY = re.compile(r"(?P<prefix>\bhttps?://)(?P<secret>[^\s:/?#@\[\]]+)(?=@)", re.I)

# Rule 4, key=value: libpq conninfo (quoted values may contain spaces and
# backslash escapes), URL query strings and `PGPASSWORD=...` in commands.
_KV_PASSWORD = re.compile(
    r"(?P<prefix>\b" + _PASSWORD_WORDS + r"\s*=\s*)"
    r"(?P<secret>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&'\"]+)",
    re.I,
)

# Rule 4, quoted key with a colon: `{'password': 'x'}` / `{"password": "x"}`.
_QUOTED_KEY_PASSWORD = re.compile(
    r"(?P<prefix>(?P<q>['\"])" + _PASSWORD_WORDS + r"(?P=q)\s*:\s*)"
    r"(?P<secret>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,}\]]+)",
    re.I,
)

# Mapping keys whose values are credentials whatever they look like.
_SENSITIVE_KEY = re.compile(
    r"(?:^|[_.\-])(?:" + _PASSWORD_NAMES + r"|secret|api[_\-]?key|"
    r"access[_\-]?token|auth[_\-]?token|refresh[_\-]?token|authorization)$",
    re.I,
)


def _filter_match(match: re.Match[str]) -> str:
    secret = match.group("secret")
    quote = secret[:1]
    if quote in ("'", '"') and len(secret) >= 2 and secret[-1:] == quote:
        # Keep the quotes so a dict repr / JSON text stays readable.
        return f"{match.group('prefix')}{quote}{FILTERED}{quote}"
    return match.group("prefix") + FILTERED


def secret_parts(value: str | None) -> list[str]:
    """The strings to redact for one configured secret value.

    The whole value plus, when it is a URL, its password (raw and
    percent-decoded) and for http(s) a user-only key (a Sentry DSN's public
    key), and for libpq conninfo / query strings the ``password`` values.
    """
    if not value or not value.strip():
        return []
    value = value.strip()
    parts = [value]
    try:
        url = urlsplit(value)
    except ValueError:
        url = None
    if url is not None and url.scheme and url.netloc and "@" in url.netloc:
        userinfo = url.netloc.rpartition("@")[0]
        user, sep, password = userinfo.partition(":")
        if sep:
            parts += [password, unquote(password)]
        elif url.scheme.lower() in ("http", "https"):
            parts += [user, unquote(user)]
    if url is not None and url.query:
        for key, val in parse_qsl(url.query, keep_blank_values=False):
            if re.fullmatch(_PASSWORD_WORDS, key, re.I):
                parts.append(val)
    for match in _KV_PASSWORD.finditer(value):
        secret = match.group("secret")
        if secret[:1] in ("'", '"') and secret[-1:] == secret[:1] and len(secret) >= 2:
            parts.append(secret)
            secret = re.sub(r"\\(.)", r"\1", secret[1:-1])
        parts.append(secret)
    # Longest first so a password inside a longer secret never splits it.
    unique = {p for p in parts if p and len(p) >= MIN_SECRET_LENGTH}
    return sorted(unique, key=len, reverse=True)


def configured_secrets(
    environ: Mapping[str, str] | None = None, extra: Iterable[str | None] = ()
) -> tuple[str, ...]:
    """Secrets from the current values of ``SECRET_ENV_VARS`` plus ``extra``
    values (e.g. a DSN passed in code rather than through the environment)."""
    env = os.environ if environ is None else environ
    parts: set[str] = set()
    for name in SECRET_ENV_VARS:
        parts.update(secret_parts(env.get(name)))
    for value in extra:
        parts.update(secret_parts(value))
    return tuple(sorted(parts, key=len, reverse=True))


class _Scrubber:
    def __init__(self, secrets: Iterable[str], drop_keys: Iterable[str]) -> None:
        ordered = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._exact = (
            re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None
        )
        self._drop_keys = frozenset(drop_keys)

    def text(self, text: str) -> str:
        if self._exact is not None:
            text = self._exact.sub(FILTERED, text)
        if "://" in text:
            text = _URL_PASSWORD.sub(_filter_match, text)
            text = _HTTP_USER_ONLY.sub(_filter_match, text)
        if "=" in text:
            text = _KV_PASSWORD.sub(_filter_match, text)
        if ":" in text:
            text = _QUOTED_KEY_PASSWORD.sub(_filter_match, text)
        return text

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes):
            return self.text(value.decode("utf-8", "replace")).encode("utf-8")
        if isinstance(value, Mapping):
            out = {}
            for key, item in value.items():
                if key in self._drop_keys:
                    continue
                new_key = self.text(key) if isinstance(key, str) else key
                if isinstance(key, str) and _SENSITIVE_KEY.search(key):
                    out[new_key] = self._mask(item)
                else:
                    out[new_key] = self.value(item)
            return out
        if isinstance(value, tuple):
            return tuple(self.value(v) for v in value)
        if isinstance(value, (list, set, frozenset)):
            return [self.value(v) for v in value]
        return value

    def _mask(self, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return value
        # Sentry attributes (logs, metrics) are {"value": ..., "type": ...}:
        # keep the shape so the item stays valid.
        if isinstance(value, Mapping) and set(value) == {"value", "type"}:
            return {"value": FILTERED, "type": "string"}
        return FILTERED


def scrub_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """Redact credentials in one string. ``secrets=None`` uses
    :func:`configured_secrets` (current environment)."""
    if secrets is None:
        secrets = configured_secrets()
    return _Scrubber(secrets, ()).text(text)


def scrub(
    value: Any,
    secrets: Iterable[str] | None = None,
    *,
    drop_keys: Iterable[str] = (),
) -> Any:
    """Return a redacted copy of a str / bytes / nested mapping / sequence.

    Mapping keys in ``drop_keys`` are removed at any depth. Non-string
    scalars are returned unchanged. ``secrets=None`` uses
    :func:`configured_secrets` (current environment).
    """
    if secrets is None:
        secrets = configured_secrets()
    return _Scrubber(secrets, drop_keys).value(value)
