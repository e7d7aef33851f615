"""``hearth tasks ...`` and ``hearth-gateway tasks ...``: the same verbs, two transports (the
device's MQTT connection, or the gateway's local control socket for the box's owner)."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import textwrap
import time
from collections.abc import Callable

import msgspec

from hearth._task_options import TaskOptions
from hearth.protocol import TaskInfo

__all__ = [
    "add_task_commands",
    "format_task",
    "format_tasks",
    "install_options",
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


def format_task(task: TaskInfo) -> str:
    triggers = ", ".join(t.topic or f"every {t.every_s:g} s" for t in task.triggers)
    lifetime = []
    if task.expires_at is not None:
        lifetime.append(f"expires {_when(task.expires_at)}")
    if task.idle_timeout_s is not None:
        lifetime.append(f"removed after {task.idle_timeout_s:g} s without its owner")
    lines = [
        f"task        {task.task_id}  {task.name}  (owner {task.owner})",
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


def format_tasks(tasks: list[TaskInfo]) -> str:
    if not tasks:
        return "no tasks"
    rows = [f"{'ID':<16} {'NAME':<18} {'STATE':<10} {'EVENTS':>7} {'FAILED':>6}  OWNER"]
    for t in tasks:
        rows.append(
            f"{t.task_id:<16} {t.name:<18} {t.state:<10} {t.events:>7} {t.failures:>6}  {t.owner}"
        )
    return "\n".join(rows)


def print_result(
    result: TaskInfo | list[TaskInfo], as_json: bool, out: Callable[[str], None] = print
) -> None:
    if as_json:
        out(msgspec.json.encode(result).decode())
    elif isinstance(result, list):
        out(format_tasks(result))
    else:
        out(format_task(result))
