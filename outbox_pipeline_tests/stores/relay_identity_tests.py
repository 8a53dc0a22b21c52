"""Relay names and event-type patterns: validated once, translated to SQL LIKE with escaping."""

from __future__ import annotations

import psycopg
import pytest

from outbox_pipeline.config.errors import ConfigurationError
from outbox_pipeline.stores.relay_identity import DEFAULT_RELAY, RelayIdentity, glob_to_like


def test_the_default_relay_is_named_default_and_takes_every_event_type():
    assert (DEFAULT_RELAY.name, DEFAULT_RELAY.event_types, DEFAULT_RELAY.like_patterns) == ("default", (), ())
    assert RelayIdentity() == DEFAULT_RELAY
    assert RelayIdentity("all", ("*",)).like_patterns == ()  # "*" is every type: no filter to evaluate


@pytest.mark.parametrize(
    "glob, like",
    [("order_*", r"order\_%"), ("user_created", r"user\_created"), ("a%b?", r"a\%b_"), ("back\\slash*", "back\\\\slash%")],
)
def test_globs_become_like_patterns_with_percent_underscore_and_backslash_escaped(glob, like):
    assert glob_to_like(glob) == like


@pytest.mark.parametrize(
    "event_type, matched",
    [("order_paid", True), ("order_", True), ("orderXpaid", False), ("an_order_paid", False), ("order%paid", False), ("order_x_", True)],
)
def test_patterns_match_whole_types_in_postgresql(postgres_server_url, event_type, matched):
    patterns = list(RelayIdentity("orders", ("order_*", "other")).like_patterns)
    with psycopg.connect(postgres_server_url) as conn:
        assert conn.execute("SELECT %s LIKE ANY(%s)", (event_type, patterns)).fetchone()[0] is matched


@pytest.mark.parametrize(
    "name, event_types, message",
    [
        ("", (), "relay name '' is not valid"),
        ("orders-eu", (), "relay name 'orders-eu' is not valid"),
        ("x" * 64, (), "is not valid"),
        ("orders", ("",), "event type pattern '' of relay 'orders' is empty"),
        ("orders", ("order paid",), "event type pattern 'order paid' of relay 'orders' has whitespace"),
        ("orders", "order_*", "event types of relay 'orders' must be a list of patterns"),
    ],
)
def test_bad_names_and_patterns_fail_in_one_line(name, event_types, message):
    with pytest.raises(ConfigurationError) as raised:
        RelayIdentity(name, event_types)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_patterns_are_kept_in_order_without_repeats():
    relay = RelayIdentity("orders", ["order_*", "refund", "order_*"])
    assert relay.event_types == ("order_*", "refund")
    assert relay.like_patterns == (r"order\_%", "refund")
