"""The gateways this device is paired with, as it last saw them: where each answered, how quick
it was, and the placement measurements ``auto`` made against it. A CLI command is a new process
each time; without this it would discover and probe again (seconds) and ``--where auto`` would
never get past its warm-up calls.

Where it is stored: next to the pairing, ``$HEARTH_CONFIG_DIR/gateways/GATEWAY_ID/known.json``
(``hearth._identity``), written atomically (a new file, renamed); pairing again replaces the
directory, and with it what was measured against the old identity. Only paired gateways are
remembered: an unpaired one is found again by discovery or named by its address.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hearth._identity import Pairing, pairings
from hearth.placement import Estimates
from hearth.transport import BrokerAddress

__all__ = ["KnownGateway", "known_gateways", "load_known", "resolve_name"]

_FILE = "known.json"
_MAX_KEYS = 256  # placement keys kept per gateway (a key is a kind and a module's hash)


@dataclass
class KnownGateway:
    """One paired gateway and what this device last measured against it."""

    pairing: Pairing
    host: str = ""  # where it last answered (empty: the address pairing gave)
    port: int = 0
    rtt_ms: float | None = None  # the last round trip measured to it
    seen_at: float = 0.0  # unix time it last answered
    estimates: dict[str, Estimates] = field(default_factory=dict)  # placement key -> measured

    @property
    def gateway_id(self) -> str:
        return self.pairing.gateway_id

    @property
    def ca_fingerprint(self) -> str:
        return self.pairing.ca_fingerprint

    @property
    def address(self) -> BrokerAddress:
        if self.host and self.port:
            return BrokerAddress(self.host, self.port)
        return self.pairing.address

    @property
    def path(self) -> Path:
        return Path(self.pairing.directory) / _FILE

    def answered(self, address: BrokerAddress, rtt_ms: float | None) -> None:
        self.host, self.port = address.host, address.port
        if rtt_ms is not None:
            self.rtt_ms = rtt_ms
        self.seen_at = time.time()

    def save(self) -> None:
        """Atomically; a device whose pairing directory went away meanwhile keeps nothing."""
        keys = sorted(self.estimates, key=lambda k: self.estimates[k].calls)[-_MAX_KEYS:]
        data = {
            "gateway_id": self.gateway_id,
            "ca_fingerprint": self.ca_fingerprint,
            "host": self.host,
            "port": self.port,
            "rtt_ms": self.rtt_ms,
            "seen_at": self.seen_at,
            "estimates": {k: _estimates_dict(self.estimates[k]) for k in keys},
        }
        tmp = self.path.with_name(f".{_FILE}.{uuid.uuid4().hex[:8]}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _estimates_dict(e: Estimates) -> dict[str, object]:
    return {
        "local_ms": e.local_ms,
        "edge_ms": e.edge_ms,
        "calls": e.calls,
        "warmed": sorted(e.warmed),
    }


def _estimates(data: object) -> Estimates | None:
    if not isinstance(data, dict):
        return None
    try:
        local = data.get("local_ms")
        edge = data.get("edge_ms")
        warmed = {w for w in data.get("warmed", []) if w in ("local", "edge")}
        return Estimates(
            local_ms=None if local is None else float(local),
            edge_ms=None if edge is None else float(edge),
            calls=int(data.get("calls", 0)),
            warmed=warmed,
            stored_calls=int(data.get("calls", 0)),
        )
    except (TypeError, ValueError):
        return None


def load_known(pairing: Pairing) -> KnownGateway:
    """What is stored for this pairing; a missing, foreign or torn file is a fresh start (it
    only holds measurements, which the next calls make again)."""
    known = KnownGateway(pairing)
    try:
        data = json.loads(known.path.read_text())
    except (OSError, ValueError):
        return known
    if not isinstance(data, dict) or data.get("ca_fingerprint") != pairing.ca_fingerprint:
        return known  # measured against another identity of that gateway
    with contextlib.suppress(TypeError, ValueError):
        known.host = str(data.get("host") or "")
        known.port = int(data.get("port") or 0)
        rtt = data.get("rtt_ms")
        known.rtt_ms = None if rtt is None else float(rtt)
        known.seen_at = float(data.get("seen_at") or 0.0)
    raw = data.get("estimates")
    if isinstance(raw, dict):
        for key, value in raw.items():
            estimates = _estimates(value)
            if estimates is not None:
                known.estimates[str(key)] = estimates
    return known


def known_gateways(directory: Path | None = None) -> list[KnownGateway]:
    """Every paired gateway, the quickest last time first (never measured: last)."""
    found = [load_known(p) for p in pairings(directory)]
    found.sort(key=lambda k: (k.rtt_ms is None, k.rtt_ms or 0.0, -k.seen_at))
    return found


def resolve_name(name: str, directory: Path | None = None) -> KnownGateway | None:
    """The paired gateway called ``name`` (its id), if this device is paired with one."""
    for known in known_gateways(directory):
        if known.gateway_id == name:
            return known
    return None
