"""Daemon configuration: a TOML file (``--config``), overridden by command-line flags. Every key
has a default, so ``hearth-gateway run`` works with no file at all."""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from hearth_gateway.errors import ConfigError

__all__ = ["Config", "default_state_dir", "load_config"]


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    gateway_id: str = ""  # default: this host's name
    state_dir: str = ""  # default: $STATE_DIRECTORY, else ~/.local/state/hearth
    # The managed broker's listener for local processes: plain MQTT, anonymous clients under an
    # ACL (docs/security.md). Keep it on loopback; LAN devices use lan_listen.
    listen: str = "127.0.0.1:1883"
    # The managed broker's listener for LAN devices: mutual TLS, paired devices only (e.g.
    # "0.0.0.0:8883"). Empty: none.
    lan_listen: str = ""
    # Where devices pair (TLS, no client certificate). Default: lan_listen's host, its port + 1.
    pairing_listen: str = ""
    pairing_code_ttl_s: float = 300.0  # how long a code from `hearth-gateway pair` is valid
    pairing_max_failures: int = 5  # failed pairing attempts that invalidate the pending codes
    broker: str = ""  # an external MQTT 5 broker (mqtt://host:port) instead of the managed one
    mdns: bool = True
    mdns_interface: str = ""  # IP of the interface to advertise on; default: where the broker is
    # The mDNS instance name people see; taken on the LAN, it becomes "NAME (2)" (RFC 6762 §9).
    mdns_name: str = ""  # default: this host's name
    workers: int = 0  # worker processes; 0 = one per CPU core
    runners: list[str] = msgspec.field(
        default_factory=lambda: ["wasm", "onnx", "task", "vision", "migrate"]
    )
    policies: list[str] = []  # TOML files merged over the embedded default policy
    # Accelerator classes this box has beyond what onnxruntime reports (a job's
    # requires.accelerator, docs/quotas.md): e.g. ["npu"] for a device a runner uses itself.
    accelerators: list[Literal["cpu", "gpu", "npu"]] = []
    # "cloud": this gateway serves public work only and refuses private jobs (policy_denied).
    tier: Literal["home", "cloud"] = "home"
    # A cloud-tier gateway's pool: the id it serves together with the other members, through
    # the broker's shared subscription (docs/protocol.md §19). Empty: none.
    pool: str = ""
    # A cloud-tier gateway's broker (mqtt://host:port, or mqtts:// for TLS): public jobs go
    # there when this one is saturated or lacks their runner (placement.py). Empty: none.
    upstream: str = ""
    upstream_gateway_id: str = ""  # default: the gateway whose status is online there
    upstream_ca: str = ""  # mqtts: CA file to trust (default: the system's)
    upstream_cert: str = ""  # mqtts: client certificate, when the upstream's broker wants one
    upstream_key: str = ""
    # The home's own MQTT broker (Home Assistant's Mosquitto, zigbee2mqtt's): mqtt://host:port
    # or mqtts://host:port. Tasks read and publish "home:" topics there (docs/home.md).
    home_broker: str = ""
    home_broker_protocol: Literal["3.1.1", "5"] = "5"
    home_broker_username: str = ""
    # The password: this file, else the systemd credential "home-broker-password"
    # ($CREDENTIALS_DIRECTORY, LoadCredential=), else none.
    home_broker_password_file: str = ""
    home_broker_ca: str = ""  # mqtts: CA file to trust (default: the system's)
    home_broker_client_id: str = ""  # default: hearth-<gateway id>
    # Publish Home Assistant MQTT discovery (and take its switch commands) on the home broker.
    home_assistant: bool = False
    home_assistant_prefix: str = "homeassistant"  # HA's discovery_prefix
    # The owner's page and /metrics (docs/metrics-and-web.md). Loopback unless web_lan is true;
    # empty: none. A port already taken is said once in the log; the daemon serves on without.
    web_listen: str = "127.0.0.1:8787"
    web_lan: bool = False  # allow web_listen off loopback: then TLS (the gateway's CA) + token


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
