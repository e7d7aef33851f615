"""What the home broker learns about the gateway: a JSON status mirror for templates, and with
``home_assistant = true`` Home Assistant's MQTT discovery (docs/home.md).

Topics on the home broker (home.home_topic_root: ``hearth/<gateway id>``):

- ``.../availability``: ``online`` / ``offline``, retained; ``offline`` is the Last Will
  (home.py), so a SIGKILLed gateway turns every entity unavailable;
- ``.../status``: the status mirror, retained JSON, republished when it changes;
- ``.../tasks/<task id>``: one task's state, retained JSON;
- ``.../tasks/<owner>/<task id>/set``: a task's switch, ``ON`` (resume) or ``OFF`` (pause).

Discovery configs go to ``<prefix>/<component>/<node>/<object>/config``, retained: one device
for the gateway (online, queue length, jobs per minute, busy workers, paired devices, tasks
running and suspended, storage free) and per task a state sensor, a last-event timestamp and
a pause/resume switch. A task that goes (cancelled, expired) gets an empty retained payload on
each of its config topics, which is how Home Assistant removes an entity; configs of tasks
that went while the gateway was away are found by subscribing to our own node's configs.

A switch command acts with the rights of the device named in its topic, the task's owner:
tasks.py's control() refuses a task of another device ("no task ... of yours") and a revoked
owner's resume, as for a request over MQTT. Every command is audited, refusals too. Anyone who
may publish to that topic on the home broker may pause a task: the home broker's ACL should
keep ``hearth/#`` to Home Assistant and the gateway (docs/home.md).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from hearth.protocol import Error, TaskControl, TaskInfo
from hearth_gateway import __version__
from hearth_gateway.dispatch import PeerLog
from hearth_gateway.home import HomeLink, availability_topic, home_topic_root

__all__ = ["GatewayFigures", "HomeAssistant"]

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_JOBS_WINDOW_S = 60.0
_TASK_OBJECTS = (("sensor", "state"), ("sensor", "last_event"), ("switch", "switch"))
_TASK_OBJECT = re.compile(r"^task_(.+)_(state|last_event|switch)$")

# actor, action, target, verdict ("allowed" | "refused"), reason
Audit = Callable[[str, str, str, str, str], None]
# (client id whose rights apply, request) -> the control's reply
Control = Callable[[str, TaskControl], object]


@dataclass(frozen=True, slots=True)
class GatewayFigures:
    """What the daemon reports each time it is asked (daemon.py builds it)."""

    queue_length: int
    busy_workers: int
    workers: int
    jobs_completed: int  # since start: jobs per minute comes from its differences
    paired_devices: int
    storage_free_bytes: int
    storage_full: bool


def _node(gateway_id: str) -> str:
    # Home Assistant's node and object ids: [a-zA-Z0-9_-]
    return "hearth_" + re.sub(r"[^A-Za-z0-9_-]", "_", gateway_id)


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="seconds")


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


class HomeAssistant:
    """Driven by the daemon: ``refresh()`` every second or two, ``on_message()`` for what
    ``owns()`` a topic of, ``connected()`` on every (re)connect of the home link."""

    def __init__(
        self,
        link: HomeLink,
        gateway_id: str,
        *,
        figures: Callable[[], GatewayFigures],
        tasks: Callable[[], list[TaskInfo]],
        control: Control,
        audit: Audit,
        discovery: bool,
        prefix: str = "homeassistant",
    ) -> None:
        self._link = link
        self._gateway_id = gateway_id
        self._figures = figures
        self._tasks = tasks
        self._control = control
        self._audit = audit
        self._discovery = discovery
        self._prefix = prefix
        self._node = _node(gateway_id)
        self._root = home_topic_root(gateway_id)
        self._availability = availability_topic(gateway_id)
        self._config_filter = f"{prefix}/+/{self._node}/+/config"
        self._command_filter = f"{self._root}/tasks/+/+/set"
        self._published: dict[str, bytes] = {}  # topic -> last retained payload sent
        self._announced: set[str] = set()  # task ids with discovery configs out
        self._stated: set[str] = set()  # task ids with a retained state out
        self._gateway_announced = False
        self._completed: deque[tuple[float, int]] = deque()  # (monotonic, jobs completed)
        self._peer_log = PeerLog()
        self.commands = 0
        self.refused_commands = 0

    # -- wiring -------------------------------------------------------------------------------

    def start(self) -> None:
        self._link.subscribe(self._command_filter, True)
        # Retained: the states of tasks gone while we were away, to clear them.
        self._link.subscribe(f"{self._root}/tasks/+", True, retained=True)
        if self._discovery:
            # Retained: our own configs, to clear those of tasks gone while we were away.
            self._link.subscribe(self._config_filter, True, retained=True)
            self._link.subscribe(f"{self._prefix}/status", True)  # Home Assistant's birth

    def owns(self, topic: str) -> bool:
        return topic.startswith((f"{self._root}/", f"{self._prefix}/"))

    def connected(self) -> None:
        """A new connection (perhaps to a broker that lost its retained messages): send
        everything again."""
        self._published.clear()
        self._announced.clear()
        self._stated.clear()
        self._gateway_announced = False
        self.refresh()

    # -- publishing ---------------------------------------------------------------------------

    def _retain(self, topic: str, payload: bytes) -> None:
        if self._published.get(topic) == payload:
            return
        self._published[topic] = payload
        self._link.publish(topic, payload, retain=True)

    def refresh(self) -> None:
        if not self._link.connected:
            return
        tasks = self._tasks()
        figures = self._figures()
        self._retain(f"{self._root}/status", _dumps(self._mirror(figures, tasks)))
        if self._discovery and not self._gateway_announced:
            self._announce_gateway()
        current = {t.task_id: t for t in tasks}
        for task in tasks:
            self._retain(f"{self._root}/tasks/{task.task_id}", _dumps(self._task_state(task)))
            self._stated.add(task.task_id)
            if self._discovery and task.task_id not in self._announced:
                self._announce_task(task)
        for gone in [t for t in self._stated if t not in current]:
            self._withdraw(gone)

    def _jobs_per_minute(self, completed: int) -> float:
        now = time.monotonic()
        window = self._completed
        window.append((now, completed))
        while len(window) > 1 and now - window[1][0] >= _JOBS_WINDOW_S:
            window.popleft()
        first_at, first = window[0]
        span = now - first_at
        return round((completed - first) * 60.0 / span, 1) if span > 0 else 0.0

    def _mirror(self, figures: GatewayFigures, tasks: list[TaskInfo]) -> dict[str, object]:
        states = [t.state for t in tasks]
        return {
            "gateway_id": self._gateway_id,
            "version": __version__,
            "state": "online",
            "queue_length": figures.queue_length,
            "jobs_per_minute": self._jobs_per_minute(figures.jobs_completed),
            "jobs_completed": figures.jobs_completed,
            "busy_workers": figures.busy_workers,
            "workers": figures.workers,
            "paired_devices": figures.paired_devices,
            "tasks": len(tasks),
            "tasks_running": states.count("running"),
            "tasks_paused": states.count("paused"),
            "tasks_suspended": states.count("suspended"),
            "storage_free_bytes": figures.storage_free_bytes,
            "storage_full": figures.storage_full,
        }

    @staticmethod
    def _task_state(task: TaskInfo) -> dict[str, object]:
        return {
            "task_id": task.task_id,
            "name": task.name,
            "owner": task.owner,
            "state": task.state,
            "reason": task.reason,
            "events": task.events,
            "dropped": task.dropped,
            "refused": task.refused,
            "last_event": _iso(task.last_event_at),
        }

    def _device(self) -> dict[str, object]:
        return {
            "identifiers": [self._node],
            "name": f"Hearth {self._gateway_id}",
            "manufacturer": "Hearth",
            "model": "home-edge gateway",
            "sw_version": __version__,
        }

    def _config_topic(self, component: str, object_id: str) -> str:
        return f"{self._prefix}/{component}/{self._node}/{object_id}/config"

    def _announce_gateway(self) -> None:
        status = f"{self._root}/status"
        common = {
            "availability_topic": self._availability,
            "device": self._device(),
            "origin": {"name": "hearth-gateway", "sw_version": __version__},
        }
        online = {
            "name": "Online",
            "unique_id": f"{self._node}_online",
            "state_topic": self._availability,
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
            "device": self._device(),
            "origin": common["origin"],
        }
        self._retain(self._config_topic("binary_sensor", "online"), _dumps(online))
        sensors: list[tuple[str, str, dict[str, object]]] = [
            (
                "queue_length",
                "Queue length",
                {"state_class": "measurement", "unit_of_measurement": "jobs"},
            ),
            (
                "jobs_per_minute",
                "Jobs per minute",
                {"state_class": "measurement", "unit_of_measurement": "jobs/min"},
            ),
            (
                "busy_workers",
                "Busy workers",
                {"state_class": "measurement", "unit_of_measurement": "workers"},
            ),
            (
                "paired_devices",
                "Paired devices",
                {"state_class": "measurement", "unit_of_measurement": "devices"},
            ),
            (
                "tasks_running",
                "Tasks running",
                {"state_class": "measurement", "unit_of_measurement": "tasks"},
            ),
            (
                "tasks_suspended",
                "Tasks suspended",
                {"state_class": "measurement", "unit_of_measurement": "tasks"},
            ),
            (
                "storage_free_bytes",
                "Storage free",
                {
                    "state_class": "measurement",
                    "device_class": "data_size",
                    "unit_of_measurement": "B",
                    "suggested_unit_of_measurement": "GB",
                },
            ),
        ]  # fmt: skip - one entity a line reads better than the formatter's 40 lines
        for key, name, extra in sensors:
            config = {
                "name": name,
                "unique_id": f"{self._node}_{key}",
                "state_topic": status,
                "value_template": f"{{{{ value_json.{key} }}}}",
                **extra,
                **common,
            }
            self._retain(self._config_topic("sensor", key), _dumps(config))
        self._gateway_announced = True

    def _announce_task(self, task: TaskInfo) -> None:
        state = f"{self._root}/tasks/{task.task_id}"
        common = {
            "availability_topic": self._availability,
            "device": self._device(),
            "state_topic": state,
            "json_attributes_topic": state,
        }
        tid = task.task_id.replace(".", "_")
        configs = {
            "state": (
                "sensor",
                {
                    "name": f"Task {task.name} state",
                    "unique_id": f"{self._node}_task_{tid}_state",
                    "value_template": "{{ value_json.state }}",
                    **common,
                },
            ),
            "last_event": (
                "sensor",
                {
                    "name": f"Task {task.name} last event",
                    "unique_id": f"{self._node}_task_{tid}_last_event",
                    "device_class": "timestamp",
                    "value_template": "{{ value_json.last_event or 'None' }}",
                    **common,
                },
            ),
            "switch": (
                "switch",
                {
                    "name": f"Task {task.name}",
                    "unique_id": f"{self._node}_task_{tid}_switch",
                    "command_topic": f"{self._root}/tasks/{task.owner}/{task.task_id}/set",
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "value_template": "{{ 'ON' if value_json.state == 'running' else 'OFF' }}",
                    **common,
                },
            ),
        }
        for suffix, (component, config) in configs.items():
            self._retain(self._config_topic(component, f"task_{tid}_{suffix}"), _dumps(config))
        self._announced.add(task.task_id)

    def _withdraw(self, task_id: str) -> None:
        """Home Assistant removes an entity whose config becomes an empty retained message."""
        tid = task_id.replace(".", "_")
        if task_id in self._announced:
            for component, suffix in _TASK_OBJECTS:
                self._retain(self._config_topic(component, f"task_{tid}_{suffix}"), b"")
            self._announced.discard(task_id)
        self._retain(f"{self._root}/tasks/{task_id}", b"")
        self._stated.discard(task_id)

    # -- messages from the home broker --------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == f"{self._prefix}/status":
            if payload == b"online":  # Home Assistant restarted: it may have lost them
                self.connected()
            return
        if topic.startswith(f"{self._prefix}/"):
            self._stale_config(topic, payload)
            return
        parts = topic.split("/")
        if len(parts) == 4 and parts[2] == "tasks" and retained and payload:
            if parts[3] not in {t.task_id for t in self._tasks()}:
                self._published.pop(topic, None)
                self._retain(topic, b"")  # a task gone while we were away
            return
        if len(parts) == 6 and parts[2] == "tasks" and parts[5] == "set" and not retained:
            self._command(parts[3], parts[4], payload)

    def _stale_config(self, topic: str, payload: bytes) -> None:
        """A config of ours found retained: a task's that is gone gets cleared."""
        parts = topic.split("/")
        match = _TASK_OBJECT.match(parts[3]) if len(parts) == 5 else None
        if not payload or match is None:
            return
        live = {t.task_id.replace(".", "_") for t in self._tasks()}
        if match.group(1) not in live:
            self._published.pop(topic, None)
            self._retain(topic, b"")

    def _command(self, owner: str, task_id: str, payload: bytes) -> None:
        self.commands += 1
        actor = f"home-assistant:{owner}"
        text = payload.decode(errors="replace").strip().upper()
        if not (_ID.match(owner) and _ID.match(task_id)) or text not in ("ON", "OFF"):
            self._refuse(actor, task_id, "a switch command is ON or OFF on a task's own topic")
            return
        # With the owner's rights: another device's task is "no task of yours".
        request = TaskControl(task_id=task_id, action="resume" if text == "ON" else "pause")
        reply = self._control(owner, request)
        if isinstance(reply, Error):
            self._refuse(actor, task_id, reply.message)
            return
        self._audit(actor, "ha_command", task_id, "allowed", request.action)
        self.refresh()  # the new state at once, not at the next tick

    def _refuse(self, actor: str, task_id: str, why: str) -> None:
        self.refused_commands += 1
        self._audit(actor, "ha_command", task_id[:64], "refused", why)
        self._peer_log.warning("ha-command", "Home Assistant command refused: %s", why)
