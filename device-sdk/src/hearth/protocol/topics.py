"""The MQTT topic layout of protocol v1. The version is part of every topic, so a v2 gateway can
serve next to a v1 one on the same broker."""

from __future__ import annotations

import re

__all__ = [
    "PREFIX",
    "SERVICE_TYPE",
    "notify_topic",
    "parse_request_topic",
    "pool_filter",
    "reply_prefix",
    "reply_topic",
    "request_filter",
    "request_topic",
    "status_topic",
]

PREFIX = "hearth/v1"
SERVICE_TYPE = "_hearth._tcp.local."

# Gateway and client ids appear as topic levels: no wildcards, separators or control bytes.
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_id(kind: str, value: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError(f"invalid {kind} id {value!r}: use 1-64 of [A-Za-z0-9_.-]")
    return value


def status_topic(gateway_id: str) -> str:
    return f"{PREFIX}/gw/{_check_id('gateway', gateway_id)}/status"


def request_topic(gateway_id: str, client_id: str) -> str:
    return f"{PREFIX}/gw/{_check_id('gateway', gateway_id)}/req/{_check_id('client', client_id)}"


def request_filter(gateway_id: str) -> str:
    return f"{PREFIX}/gw/{_check_id('gateway', gateway_id)}/req/+"


def pool_filter(pool_id: str) -> str:
    """A pool member's shared subscription (MQTT 5, ``$share/{group}/{filter}``): the broker
    gives each request sent to the pool's id to one member of the group. The group is named
    after the pool, so two pools on one broker never share work."""
    return f"$share/{_check_id('pool', pool_id)}/{request_filter(pool_id)}"


def reply_prefix(client_id: str) -> str:
    """Every Response Topic a client names must start with this (the gateway refuses others, so a
    device cannot make the gateway publish into another device's topics)."""
    return f"{PREFIX}/dev/{_check_id('client', client_id)}/"


def reply_topic(client_id: str) -> str:
    return reply_prefix(client_id) + "reply"


def notify_topic(client_id: str) -> str:
    """Where a task's notifications to its owner go."""
    return reply_prefix(client_id) + "notify"


def parse_request_topic(topic: str) -> tuple[str, str] | None:
    """(gateway_id, client_id) of a request topic, or None if it is not one."""
    parts = topic.split("/")
    if len(parts) != 6 or "/".join(parts[:2]) != PREFIX or parts[2] != "gw" or parts[4] != "req":
        return None
    if not (_ID_RE.match(parts[3]) and _ID_RE.match(parts[5])):
        return None
    return parts[3], parts[5]
