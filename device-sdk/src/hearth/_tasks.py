"""Persistent tasks (docs/tasks.md): install, list and control this device's tasks on its
gateway, and receive their notifications. Part of ``hearth.Client``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Unpack

import msgspec
import paho.mqtt.client as mqtt

from hearth._core import ClientCore
from hearth._task_options import TaskOptions, task_install_request
from hearth.errors import ErrorCode, HearthError, JobError
from hearth.placement import Placement
from hearth.protocol import (
    Error,
    Notification,
    Reply,
    Task,
    TaskControl,
    TaskInfo,
    TaskList,
    TaskListResult,
    decode_notification,
    notify_topic,
)
from hearth.transport import connect, make_client

__all__ = ["TaskCalls"]

log = logging.getLogger(__name__)


class TaskCalls(ClientCore):
    def install_task(
        self, module: bytes | str | Path, name: str, **options: Unpack[TaskOptions]
    ) -> TaskInfo:
        """Install a persistent task (docs/tasks.md) on the gateway, owned by this device.

        ``options`` (``hearth._task_options.TaskOptions``): ``on``, MQTT topic filters that
        wake it; ``every_s``: a timer; ``read`` (default: the ``on`` filters) and
        ``may_publish``: its grants; ``expires_at`` (unix seconds) and ``idle_timeout_s`` (since
        this device was last seen): its lifetime; ``config``, ``checkpoint_every``,
        ``checkpoint_every_s``. ``data_class``: the task's label (its module is uploaded with
        it); a private task (the default) is never installed on a gateway off the LAN or on a
        cloud tier: JobError ``forbidden``."""
        blob = self._blob(module)
        conn = self.connection()
        # Checked once connected, when the gateway's tier is known: the request itself carries
        # the task's config, so it must not even be sent.
        private = options.get("data_class", "private") == "private"
        why = self._off_lan(private, Placement.EDGE)
        if why is not None:
            raise JobError(ErrorCode.FORBIDDEN, why)
        request = task_install_request(blob.sha256, name, **options)
        request = msgspec.structs.replace(request, app=self._wire_app())
        reply = self._submit(conn, request, blob, uuid.uuid4().bytes)
        return _task_info(reply)

    def tasks(self) -> list[TaskInfo]:
        """This device's tasks on the gateway."""
        reply = self.connection().request(TaskList(), uuid.uuid4().bytes, self.timeout_s)
        if isinstance(reply, Error):
            raise JobError(reply.code, reply.message)
        if not isinstance(reply, TaskListResult):
            raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
        return list(reply.tasks)

    def task(self, task_id: str, action: str = "show") -> TaskInfo:
        """Show, pause, resume or cancel one of this device's tasks."""
        request = TaskControl(task_id=task_id, action=action)  # type: ignore[arg-type]
        reply = self.connection().request(request, uuid.uuid4().bytes, self.timeout_s)
        return _task_info(reply)

    def notifications(
        self, callback: Callable[[Notification], None], *, session_expiry_s: int = 7 * 86400
    ) -> Callable[[], None]:
        """Deliver this device's task notifications to ``callback`` (on paho's thread).

        Uses a persistent MQTT session: notifications sent while the device slept arrive when
        it calls this again with the same client id. Returns a function that stops it."""
        conn = self.connection()
        client = make_client(f"{self.client_id}-notify", tls=conn.tls)
        topic = notify_topic(self.client_id)

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                callback(decode_notification(msg.payload))
            except HearthError:
                log.warning("ignoring a malformed notification")

        def subscribe() -> None:
            client.subscribe(topic, qos=1)

        client.on_message = on_message
        connect(
            client,
            conn.address,
            clean_start=False,
            session_expiry_s=session_expiry_s,
            on_connected=subscribe,
        )

        def stop() -> None:
            client.disconnect()
            client.loop_stop()

        return stop


def _task_info(reply: Reply) -> TaskInfo:
    if isinstance(reply, Error):
        raise JobError(reply.code, reply.message)
    if not isinstance(reply, Task):
        raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
    return reply.task
