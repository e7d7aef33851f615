"""``hearth tasks ...`` and ``hearth-gateway tasks ...``: the same verbs, two transports (the
device's MQTT connection, or the gateway's local control socket for the box's owner)."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import textwrap
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from hearth._task_options import TaskOptions
from hearth.errors import HearthError
from hearth.protocol import TaskInfo

if TYPE_CHECKING:
    from hearth.client import Client

__all__ = [
    "add_task_commands",
    "format_task",
    "format_tasks",
    "install_options",
    "list_everywhere",
    "parse_when",
]


def add_task_commands(
    parser: argparse.ArgumentParser,
    common: Callable[[argparse.ArgumentParser], object],
    prog: str = "hearth",
) -> None:
    """Add the task verbs as sub-commands of ``parser`` (dest ``task_command``); ``common`` adds
    the options every verb takes (how to reach the gateway); ``prog`` names the command in the
    examples."""
    sub = parser.add_subparsers(dest="task_command", required=True, metavar="VERB")

    def verb(name: str, help_: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=textwrap.fill(help_[:1].upper() + help_[1:] + "."),
            epilog=f"example:\n  {prog} tasks {example}\n",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    install = verb(
        "install",
        "install a persistent task (a WASM reactor)",
        "install indexer.wasm --name primes --every 60 --set limit=100000 --expires 7d",
    )
    install.add_argument("module", help="the task's .wasm file")
    install.add_argument("--name", required=True, help="a name for people (in lists and notes)")
    install.add_argument(
        "--on",
        action="append",
        default=[],
        metavar="FILTER",
        help="MQTT topic filter that wakes the task (repeatable)",
    )
    install.add_argument("--every", type=float, metavar="SECONDS", help="a timer trigger")
    install.add_argument(
        "--may-read",
        action="append",
        default=[],
        metavar="FILTER",
        help="read grant (default: the --on filters)",
    )
    install.add_argument(
        "--may-publish",
        action="append",
        default=[],
        metavar="TOPIC",
        help="topic (or filter) the task may publish to (repeatable)",
    )
    install.add_argument(
        "--expires", metavar="WHEN", help="ISO time, unix seconds, or a duration like 2h / 30m / 7d"
    )
    install.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        help="remove the task when its owner has not been seen for S seconds",
    )
    install.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="initial key-value state (the task's configuration)",
    )
    install.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="store the task's state every N events (default 1)",
    )
    install.add_argument(
        "--checkpoint-every-s",
        type=float,
        metavar="S",
        help="also store the task's state at least every S seconds",
    )
    install.add_argument(
        "--public",
        action="store_true",
        help="label the task (and its module) public: a cloud-tier gateway installs only "
        "public tasks (default: private)",
    )
    common(install)
    listing = verb("list", "list tasks", "list --json")
    listing.add_argument("--json", action="store_true", help="print JSON")
    common(listing)
    for name in ("show", "pause", "resume", "cancel"):
        one = verb(name, f"{name} a task", f"{name} t-5c1e2f3a9b7d")
        one.add_argument("task_id", help="the task's id, as install and list print it")
        one.add_argument("--json", action="store_true", help="print JSON")
        common(one)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_when(text: str, now: float | None = None) -> float:
    """Unix seconds from ``2026-12-01T08:00``, ``1795000000`` or a duration ``90m``."""
    now = time.time() if now is None else now
    match = _DURATION.match(text.strip())
    if match:
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return now + float(match.group(1)) * scale
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"--expires: cannot read {text!r} as a time or duration") from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as a person means it
    return when.timestamp()


def install_options(args: argparse.Namespace) -> TaskOptions:
    """The ``install`` verb's options, as keyword arguments of ``Client.install_task`` (and of
    ``task_install_request``)."""
    return {
        "on": args.on,
        "every_s": args.every,
        "read": args.may_read,
        "may_publish": args.may_publish,
        "expires_at": parse_when(args.expires) if args.expires else None,
        "idle_timeout_s": args.idle_timeout,
        "config": parse_settings(args.set),
        "checkpoint_every": args.checkpoint_every,
        "checkpoint_every_s": args.checkpoint_every_s,
        "data_class": "public" if args.public else "private",
    }


def parse_settings(pairs: list[str]) -> dict[str, str]:
    config: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {pair!r}")
        config[key] = value
    return config


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def format_task(task: TaskInfo, gateway: str | None = None) -> str:
    triggers = ", ".join(t.topic or f"every {t.every_s:g} s" for t in task.triggers)
    lifetime = []
    if task.expires_at is not None:
        lifetime.append(f"expires {_when(task.expires_at)}")
    if task.idle_timeout_s is not None:
        lifetime.append(f"removed after {task.idle_timeout_s:g} s without its owner")
    lines = [
        f"task        {task.task_id}  {task.name}  (owner {task.owner})",
        *([f"gateway     {gateway}"] if gateway else []),
        f"state       {task.state}" + (f": {task.reason}" if task.reason else ""),
        f"data class  {task.data_class}",
        f"triggers    {triggers}",
        f"may read    {', '.join(task.read) or '-'}",
        f"may publish {', '.join(task.publish) or '-'}",
        f"lifetime    {'; '.join(lifetime) or 'until cancelled'}",
        f"events      {task.events} handled, {task.failures} failed, {task.dropped} dropped; "
        f"last {_when(task.last_event_at)}",
        f"publishes   {task.publishes} sent, {task.refused} refused by the grants",
        f"resources   {task.fuel_used} fuel, {task.memory_bytes // 1024} KiB memory, "
        f"{task.checkpoint_bytes} B checkpoint",
    ]
    if task.last_error:
        lines.append(f"last error  {task.last_error}")
    return "\n".join(lines)


def format_tasks(tasks: list[TaskInfo], gateways: list[str | None] | None = None) -> str:
    """A table; ``gateways``, when given, the gateway each task lives on (a column)."""
    if not tasks:
        return "no tasks"
    where = gateways if gateways is not None else [None] * len(tasks)
    column = gateways is not None
    head = f"{'GATEWAY':<16} " if column else ""
    rows = [f"{head}{'ID':<16} {'NAME':<18} {'STATE':<10} {'EVENTS':>7} {'FAILED':>6}  OWNER"]
    for t, gw in zip(tasks, where, strict=True):
        cell = f"{gw or '-':<16} " if column else ""
        rows.append(
            f"{cell}{t.task_id:<16} {t.name:<18} {t.state:<10} {t.events:>7} {t.failures:>6}  "
            f"{t.owner}"
        )
    return "\n".join(rows)


def print_result(
    result: TaskInfo | list[TaskInfo],
    as_json: bool,
    out: Callable[[str], None] = print,
    *,
    gateway: str | None = None,
) -> None:
    """One task or a list, from one gateway (``gateway``: its id, shown when known)."""
    if as_json:
        data = msgspec.to_builtins(result)
        if gateway is not None:
            for item in data if isinstance(data, list) else [data]:
                item["gateway_id"] = gateway
        out(msgspec.json.encode(data).decode())
    elif isinstance(result, list):
        out(format_tasks(result, [gateway] * len(result) if gateway else None))
    else:
        out(format_task(result, gateway))


def list_everywhere(
    args: argparse.Namespace, make_client: Callable[[argparse.Namespace, str], Client]
) -> int:
    """``hearth tasks list`` without --gateway: every paired gateway is asked (a task lives on
    one gateway, so asking whichever answers first shows some tasks and hides others), each
    task shown with its gateway's id. With no pairing, the one gateway found is asked."""
    import sys

    from hearth._known import known_gateways

    names: list[str | None] = [k.gateway_id for k in known_gateways()] or [None]
    tasks: list[TaskInfo] = []
    where: list[str | None] = []
    failed = 0
    for name in names:
        one = argparse.Namespace(**{**vars(args), "gateway": name})
        try:
            with make_client(one, "edge") as client:
                found = client.tasks()
                gateway = client.gateway_id
        except HearthError as exc:
            failed += 1
            print(f"hearth: gateway {name or '?'}: {exc}", file=sys.stderr)
            continue
        tasks += found
        where += [gateway] * len(found)
    if failed == len(names):
        raise SystemExit(3)
    if args.json:
        data = msgspec.to_builtins(tasks)
        for item, gateway in zip(data, where, strict=True):
            item["gateway_id"] = gateway
        print(msgspec.json.encode(data).decode())
    else:
        print(format_tasks(tasks, where))
    return 0
