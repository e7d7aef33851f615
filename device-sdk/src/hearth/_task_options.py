"""How a persistent task runs (docs/tasks.md), defined once: the keyword arguments of
``Client.install_task``, what ``hearth tasks install`` and ``hearth-gateway tasks install`` read
from their flags (``hearth._tasks_cli.install_options``), and the ``task_install`` message they
all become (``task_install_request``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict, Unpack

from hearth.protocol import DataClass, TaskInstall, Trigger

__all__ = ["TaskOptions", "task_install_request"]


class TaskOptions(TypedDict, total=False):
    """A task's options besides its module and name, all optional (the default in brackets).

    ``data_class``: "private" (the default) is never installed on a gateway off the LAN or on a
    cloud tier; the task's module is uploaded with the same label."""

    on: Sequence[str]  # MQTT topic filters that wake the task [none]
    every_s: float | None  # a timer trigger, seconds [none]
    read: Sequence[str]  # its read grant [the ``on`` filters]
    may_publish: Sequence[str]  # topics or filters it may publish to [none]
    expires_at: float | None  # unix seconds: removed then [never]
    idle_timeout_s: float | None  # removed when its owner was not seen this long [never]
    config: Mapping[str, str] | None  # its initial key-value state [empty]
    checkpoint_every: int  # store its state every N events [1]
    checkpoint_every_s: float | None  # or every S seconds [no clock]
    data_class: DataClass  # ["private"]


def task_install_request(
    module_sha256: str, name: str, **options: Unpack[TaskOptions]
) -> TaskInstall:
    """The ``task_install`` message for a module already named by its hash."""
    triggers = [Trigger(topic=t) for t in options.get("on", ())]
    every_s = options.get("every_s")
    if every_s is not None:
        triggers.append(Trigger(every_s=every_s))
    return TaskInstall(
        name=name,
        module=module_sha256,
        triggers=triggers,
        read=list(options.get("read", ())),
        publish=list(options.get("may_publish", ())),
        expires_at=options.get("expires_at"),
        idle_timeout_s=options.get("idle_timeout_s"),
        config=dict(options.get("config") or {}),
        checkpoint_every=options.get("checkpoint_every", 1),
        checkpoint_every_s=options.get("checkpoint_every_s"),
        data_class=options.get("data_class", "private"),
    )
