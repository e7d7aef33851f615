"""A pool of cloud-tier gateways: many members serve one gateway id through one MQTT 5 broker
(or cluster) with a shared subscription (docs/protocol.md §19).

The member's side is small and lives where a request already goes: the link subscribes to
``pool_filter`` besides its own request filter and announces the pool's status on every
connect, and the dispatcher answers a job that came through the pool with ``accepted`` (or a
``need_blob`` naming this member). This module checks the configuration and says how the link
is set up. The submitter's side (a home gateway's upstream) is ``upstream.py``.
"""

from __future__ import annotations

from typing import TypedDict

import msgspec

from hearth.protocol import GatewayStatus, encode, status_topic
from hearth.protocol.topics import pool_filter
from hearth_gateway.config import Config
from hearth_gateway.errors import ConfigError

__all__ = ["PoolLinkOptions", "check_pool", "pool_filter", "pool_link_options"]


class PoolLinkOptions(TypedDict, total=False):
    session_expiry_s: int
    extra_status: tuple[str, bytes]
    shared_filter: str


def check_pool(config: Config, gateway_id: str) -> None:
    """Refuse a pool setting that cannot work: raises ConfigError."""
    if not config.pool:
        return
    if config.tier != "cloud":
        raise ConfigError('pool: only cloud-tier gateways form a pool (tier = "cloud")')
    if config.pool == gateway_id:
        raise ConfigError(f"pool: the pool's id {config.pool!r} must differ from this member's")
    try:
        pool_filter(config.pool)
    except ValueError as exc:
        raise ConfigError(f"pool: {exc}") from None


def pool_link_options(config: Config, gateway_id: str, online: GatewayStatus) -> PoolLinkOptions:
    """The link's settings for a pool member (after ``check_pool``: raises ConfigError): the
    shared subscription to the pool's requests, a session that ends with its connection, and
    the pool's retained status (this member's, under the pool's id) published on each
    connect. Nothing for a gateway outside a pool."""
    check_pool(config, gateway_id)
    if not config.pool:
        return {}
    status = msgspec.structs.replace(online, gateway_id=config.pool)
    return {
        "session_expiry_s": 0,
        "extra_status": (status_topic(config.pool), encode(status)),
        "shared_filter": pool_filter(config.pool),
    }
