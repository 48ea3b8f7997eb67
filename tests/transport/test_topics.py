"""Topic layout of docs/INTERFACES.md as pure functions (no broker needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kombu_mqtt import UnsupportedPatternError, topics


def test_escape_covers_every_mqtt_special_character() -> None:
    assert topics.escape("a/b+c#d$e%f") == "a%2Fb%2Bc%23d%24e%25f"


@given(st.text())
def test_escape_roundtrips_and_is_one_safe_level(name: str) -> None:
    level = topics.escape(name)
    assert not set("/+#$") & set(level)
    assert topics.unescape(level) == name


def test_publish_topics_follow_interfaces_table() -> None:
    assert topics.publish_topic("P", "E", "direct", "R") == "P/d/E/R"
    assert topics.publish_topic("P", "E", "topic", "a.b.c") == "P/t/E/a/b/c"
    assert topics.publish_topic("P", "E", "fanout", "ignored") == "P/f/E"
    assert topics.publish_topic("P", "", "direct", "Q") == "P/d/amq.default/Q"
    assert topics.publish_topic("P", "celery", "direct", "celery") == "P/d/celery/celery"


def test_routing_key_is_one_level_for_direct_exchanges() -> None:
    assert topics.publish_topic("P", "E", "direct", "a/b.c") == "P/d/E/a%2Fb.c"


def test_binding_filters_follow_interfaces_table() -> None:
    assert topics.binding_filter("P", "Q", "E", "direct", "R") == "$share/Q/P/d/E/R"
    assert topics.binding_filter("P", "Q", "E", "topic", "a.*.#") == "$share/Q/P/t/E/a/+/#"
    assert topics.binding_filter("P", "Q", "E", "fanout", "") == "P/f/E"
    assert topics.default_filter("P", "Q") == "$share/Q/P/d/amq.default/Q"
    assert topics.binding_filter("P", "a/b", "E", "direct", "R") == "$share/a%2Fb/P/d/E/R"


def test_hash_before_last_word_is_refused_with_a_fix() -> None:
    with pytest.raises(UnsupportedPatternError, match="move '#' to the end"):
        topics.topic_pattern_levels("a.#.b")


def test_subscription_ids_are_stable_valid_and_probe_on_collision() -> None:
    first = topics.subscription_id("$share/Q/P/d/E/R")
    assert first == topics.subscription_id("$share/Q/P/d/E/R")
    assert 1 <= first <= topics.MAX_SUBSCRIPTION_ID
    assert topics.subscription_id("$share/Q/P/d/E/R", {first}) != first
