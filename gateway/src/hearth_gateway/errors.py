"""Exceptions of the gateway package::

    GatewayError            root
    ├── ConfigError         bad configuration or policy file (the daemon refuses to start)
    └── BrokerError         the managed Mosquitto could not be started or kept running

Errors a *peer* causes are not exceptions here: they are ``hearth.errors.ErrorCode`` values
answered on the wire (see dispatch.py).
"""

from __future__ import annotations

__all__ = ["BrokerError", "ConfigError", "GatewayError"]


class GatewayError(Exception):
    """Root of the gateway's own exceptions."""


class ConfigError(GatewayError):
    """A configuration or policy file is wrong; the message says which key and why."""


class BrokerError(GatewayError):
    """The managed broker failed to start or keeps dying."""
