"""Pure mapping between kombu names and MQTT topics (see docs/INTERFACES.md).

Why a module of its own: the topic layout is the contract between every process
on the broker (workers, producers, other transports); keeping it in pure
functions lets it be unit-tested without a broker and read in one place.
"""

from __future__ import annotations

import zlib

from .errors import UnsupportedPatternError

DEFAULT_EXCHANGE = "amq.default"
MAX_SUBSCRIPTION_ID = 268_435_455  # MQTT 5: variable byte integer, 1 .. 2**28 - 1

_ESCAPES = (("%", "%25"), ("/", "%2F"), ("+", "%2B"), ("#", "%23"), ("$", "%24"))


def escape(name: str) -> str:
    """Make `name` safe as one topic level or share name (reversible)."""
    for raw, quoted in _ESCAPES:
        name = name.replace(raw, quoted)
    return name


def unescape(level: str) -> str:
    """Inverse of :func:`escape`."""
    for raw, quoted in reversed(_ESCAPES):
        level = level.replace(quoted, raw)
    return level


def _words(routing_key: str) -> list[str]:
    return [escape(word) for word in routing_key.split(".")] if routing_key else []


def publish_topic(prefix: str, exchange: str, exchange_type: str, routing_key: str) -> str:
    """The topic a message published to `exchange` with `routing_key` goes to."""
    if not exchange:
        return f"{prefix}/d/{DEFAULT_EXCHANGE}/{escape(routing_key)}"
    if exchange_type == "fanout":
        return f"{prefix}/f/{escape(exchange)}"
    if exchange_type == "topic":
        return "/".join([prefix, "t", escape(exchange), *_words(routing_key)])
    return f"{prefix}/d/{escape(exchange)}/{escape(routing_key)}"


def default_filter(prefix: str, queue: str) -> str:
    """The shared subscription every queue has on the default exchange."""
    return f"$share/{escape(queue)}/{prefix}/d/{DEFAULT_EXCHANGE}/{escape(queue)}"


def topic_pattern_levels(pattern: str) -> list[str]:
    """AMQP topic pattern (`a.*.#`) -> MQTT filter levels (`a/+/#`)."""
    words = pattern.split(".") if pattern else []
    levels: list[str] = []
    for index, word in enumerate(words):
        if word == "*":
            levels.append("+")
        elif word == "#":
            if index != len(words) - 1:
                raise UnsupportedPatternError(
                    f"topic pattern {pattern!r} has '#' before its last word, which MQTT cannot express:"
                    " move '#' to the end or bind several patterns"
                )
            levels.append("#")
        else:
            levels.append(escape(word))
    return levels


def binding_filter(prefix: str, queue: str, exchange: str, exchange_type: str, routing_key: str) -> str:
    """The subscription filter that implements binding `queue` to `exchange`."""
    if exchange_type == "fanout":
        return f"{prefix}/f/{escape(exchange)}"
    share = f"$share/{escape(queue)}/"
    if not exchange:
        return default_filter(prefix, queue)
    if exchange_type == "topic":
        return share + "/".join([prefix, "t", escape(exchange), *topic_pattern_levels(routing_key)])
    return f"{share}{prefix}/d/{escape(exchange)}/{escape(routing_key)}"


def subscription_id(topic_filter: str, taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A Subscription Identifier derived from the filter text.

    Deterministic so that messages the broker redelivers to a resumed session
    (carrying the identifier of the previous process's subscription) still map
    to the right filter; linear probing resolves the rare collision.
    """
    ident = zlib.crc32(topic_filter.encode()) % MAX_SUBSCRIPTION_ID + 1
    while ident in taken:
        ident = ident % MAX_SUBSCRIPTION_ID + 1
    return ident
