"""Daemon configuration: a TOML file (``--config``), overridden by command-line flags. Every key
has a default, so ``hearth-gateway run`` works with no file at all."""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path

import msgspec

from hearth_gateway.errors import ConfigError

__all__ = ["Config", "default_state_dir", "load_config"]


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    gateway_id: str = ""  # default: this host's name
    state_dir: str = ""  # default: $STATE_DIRECTORY, else ~/.local/state/hearth
    # The managed broker's listener. Loopback only by default: pass 0.0.0.0:1883 to serve the
    # LAN (the broker is unauthenticated until device pairing is configured).
    listen: str = "127.0.0.1:1883"
    broker: str = ""  # an external MQTT 5 broker (mqtt://host:port) instead of the managed one
    mdns: bool = True
    mdns_interface: str = ""  # IP of the interface to advertise on; default: where the broker is
    workers: int = 0  # worker processes; 0 = one per CPU core
    runners: list[str] = msgspec.field(default_factory=lambda: ["wasm", "onnx", "task", "vision"])
    policies: list[str] = []  # TOML files merged over the embedded default policy


def default_state_dir() -> Path:
    # systemd's StateDirectory= sets this; otherwise a per-user location.
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path.home() / ".local" / "state" / "hearth"


def default_gateway_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]) or "hearth"
    return name[:64]


def load_config(path: Path | None) -> Config:
    if path is None:
        return Config()
    try:
        data = tomllib.loads(path.read_text())
        return msgspec.convert(data, Config)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"config {path}: {exc}") from None
