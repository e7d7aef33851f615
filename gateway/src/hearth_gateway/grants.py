"""What the box owner lets a paired LAN device do beyond the protocol: publish and subscribe
under topic trees (``hearth-gateway devices grant cam-1 --publish home/sensors/#``), so a
Hearth-paired sensor can feed a task, or a paired panel can listen to a light (docs/home.md).

The book is a small JSON file in the state directory, written whole (a temporary file, then a
rename). acl.py turns it into ``topic write`` / ``topic read`` lines in the device's own section
of the LAN listener's ACL; Mosquitto then refuses everything else (MQTT 5: PUBACK 0x87). A
revoked device has no section at all, whatever its grants say.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from hearth_gateway.policy import task_topic_error

__all__ = ["DeviceGrants", "GrantBook", "grant_error"]


class DeviceGrants(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    publish: list[str] = []
    subscribe: list[str] = []


def grant_error(topic_filter: str) -> str | None:
    """Why a device may not be granted this filter: the same rules as a task's grants (never
    hearth/... nor $..., a named first level, wildcards as whole levels)."""
    return task_topic_error(topic_filter, is_filter=True)


@dataclass
class GrantBook:
    path: Path | None = None  # None: kept in memory only (a service built by a unit test)
    grants: dict[str, DeviceGrants] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path) -> GrantBook:
        path = state_dir / "device-grants.json"
        book = cls(path)
        if path.exists():
            for entry in msgspec.json.decode(path.read_bytes(), type=list[DeviceGrants]):
                book.grants[entry.device_id] = entry
        return book

    def _save(self) -> None:
        if self.path is None:
            return
        staging = self.path.with_suffix(".tmp")
        staging.write_bytes(msgspec.json.encode(sorted(self.grants.values(), key=_key)))
        os.replace(staging, self.path)

    def add(self, device_id: str, publish: list[str], subscribe: list[str]) -> DeviceGrants:
        old = self.grants.get(device_id, DeviceGrants(device_id=device_id))
        new = DeviceGrants(
            device_id=device_id,
            publish=sorted({*old.publish, *publish}),
            subscribe=sorted({*old.subscribe, *subscribe}),
        )
        self.grants[device_id] = new
        self._save()
        return new

    def remove(self, device_id: str, publish: list[str], subscribe: list[str]) -> DeviceGrants:
        """Take the named filters back; none named: all of the device's."""
        old = self.grants.get(device_id, DeviceGrants(device_id=device_id))
        everything = not publish and not subscribe
        new = DeviceGrants(
            device_id=device_id,
            publish=[] if everything else [f for f in old.publish if f not in publish],
            subscribe=[] if everything else [f for f in old.subscribe if f not in subscribe],
        )
        if new.publish or new.subscribe:
            self.grants[device_id] = new
        else:
            self.grants.pop(device_id, None)
        self._save()
        return new

    def acl_entries(self) -> tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]:
        """(device id, publish filters, subscribe filters), for BrokerSecurity."""
        return tuple(
            (g.device_id, tuple(g.publish), tuple(g.subscribe))
            for g in sorted(self.grants.values(), key=_key)
        )


def _key(grants: DeviceGrants) -> str:
    return grants.device_id
