# PYTHON_ARGCOMPLETE_OK (argcomplete: this command completes itself; hearth._completion)
"""``hearth-gateway``: run the daemon, or look at it."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

import msgspec

from hearth._completion import add_completion_command, autocomplete, print_shellcode
from hearth._task_options import task_install_request
from hearth._tasks_cli import add_task_commands, install_options, print_result
from hearth_gateway import __version__
from hearth_gateway._logging import configure_logging
from hearth_gateway.config import default_state_dir, load_config
from hearth_gateway.errors import GatewayError
from hearth_gateway.status import format_status, read_snapshot

__all__ = ["main"]

_DESCRIPTION = "hearth-gateway: run the Hearth gateway daemon, or look at it."

_EPILOG = """\
examples:
  hearth-gateway run --lan-listen 0.0.0.0:8883
  hearth-gateway status
  hearth-gateway pair

exit codes:
  0    success (status: the gateway is online)
  1    the gateway refused the request, or a doctor check failed
  2    usage or configuration error
  3    no running gateway with this state directory (status: not online)
"""

EXIT_NO_GATEWAY = 3  # as `hearth`'s code for "no gateway reachable"
_STATE_DIR_HELP = (
    "the daemon's state directory (default: $STATE_DIRECTORY or ~/.local/state/hearth)"
)


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_: str, example: str
) -> argparse.ArgumentParser:
    """A sub-command whose --help ends with its example(s), kept as written."""
    return sub.add_parser(
        name,
        help=help_,
        description=textwrap.fill(help_[:1].upper() + help_[1:] + "."),
        epilog=f"example:\n  {example}\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", metavar="DIR", help=_STATE_DIR_HELP)


def _usage_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """``usage``; returns ``sub`` for the next command."""
    usage = _command(
        sub,
        "usage",
        "quota usage per device and application: today's run time, stored bytes, tasks",
        "hearth-gateway usage --json",
    )
    _state_dir(usage)
    usage.add_argument("--json", action="store_true", help="one JSON object per line")
    usage.add_argument("--day", metavar="YYYY-MM-DD", help="another UTC day's run time")
    return sub


def _mdns_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--mdns-interface", metavar="IP", help="advertise on this interface only")
    run.add_argument("--no-mdns", action="store_true", help="do not advertise over mDNS")
    run.add_argument(
        "--mdns-name",
        metavar="NAME",
        help="mDNS instance name (default: the host name; 'NAME (2)' if taken on the LAN)",
    )


def _grant_commands(
    verbs: argparse._SubParsersAction[argparse.ArgumentParser], revoke: argparse.ArgumentParser
) -> None:
    """devices grant / ungrant / grants: topic trees a paired device may use (docs/home.md);
    and revoke's --state-dir, which comes last in its help."""
    _state_dir(revoke)
    for verb, summary, example in (
        (
            "grant",
            "let a paired device publish/subscribe under topic trees",
            "hearth-gateway devices grant hall-sensor --publish home/sensors/#",
        ),
        (
            "ungrant",
            "take grants back (none named: all of the device's)",
            "hearth-gateway devices ungrant hall-sensor --publish home/sensors/#",
        ),
    ):
        command = _command(verbs, verb, summary, example)
        command.add_argument("device_id", help="the device's id, as devices list shows it")
        for flag in ("--publish", "--subscribe"):
            command.add_argument(
                flag, action="append", default=[], metavar="FILTER", help="MQTT filter (repeatable)"
            )
        _state_dir(command)
    listing = _command(
        verbs, "grants", "every device's topic grants", "hearth-gateway devices grants --json"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _state_dir(listing)


def _web_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], run: argparse.ArgumentParser
) -> None:
    """Looking at the gateway: ``status``; the owner's page, where ``run`` serves it, and
    ``web-token``, which logs in to it."""
    status = _command(sub, "status", "show the gateway's state", "hearth-gateway status --json")
    _state_dir(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    run.add_argument(
        "--web-listen",
        metavar="HOST:PORT",
        help="the owner's page and /metrics (default 127.0.0.1:8787; empty: none)",
    )
    web = _command(
        sub,
        "web-token",
        "print the token that logs in to the owner's page (made on first use)",
        "hearth-gateway web-token",
    )
    _state_dir(web)
    web.add_argument(
        "--new", action="store_true", help="replace it (the daemon uses it from its next start)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hearth-gateway",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = _command(
        sub,
        "run",
        "run the gateway daemon in the foreground",
        "hearth-gateway run --config /etc/hearth/gateway.toml --lan-listen 0.0.0.0:8883",
    )
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    _state_dir(run)
    run.add_argument(
        "--listen", metavar="HOST:PORT", help="managed broker listener (default 127.0.0.1:1883)"
    )
    run.add_argument("--broker", metavar="URL", help="use an external MQTT 5 broker instead")
    run.add_argument(
        "--lan-listen",
        metavar="HOST:PORT",
        help="TLS listener for paired LAN devices, e.g. 0.0.0.0:8883",
    )
    run.add_argument(
        "--pairing-listen",
        metavar="HOST:PORT",
        help="where devices pair (default: the LAN listener's port + 1)",
    )
    _mdns_options(run)
    run.add_argument("--gateway-id", metavar="ID", help="gateway id (default: the host name)")
    run.add_argument(
        "--workers", type=int, metavar="N", help="worker processes (default: one per core)"
    )
    run.add_argument(
        "--tier",
        choices=["home", "cloud"],
        help="cloud: serve public work only, refuse private jobs (default home)",
    )
    run.add_argument(
        "--pool",
        metavar="ID",
        help="cloud tier: serve the pool ID with the other members on this broker",
    )
    run.add_argument(
        "--upstream",
        metavar="URL",
        help="a cloud-tier gateway's broker (mqtt:// or mqtts://HOST:PORT) for "
        "public work when this one is saturated",
    )
    run.add_argument(
        "--upstream-gateway-id",
        metavar="ID",
        help="the upstream gateway (default: the one online there)",
    )
    run.add_argument("--upstream-ca", metavar="FILE", help="mqtts upstream: CA file to trust")
    run.add_argument("--upstream-cert", metavar="FILE", help="mqtts upstream: client certificate")
    run.add_argument("--upstream-key", metavar="FILE", help="mqtts upstream: its private key")
    run.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="FILE",
        help="policy TOML merged over the defaults (repeatable)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    tasks = _command(
        sub,
        "tasks",
        "persistent tasks (all of them: for the box's owner)",
        "hearth-gateway tasks list",
    )
    add_task_commands(tasks, _state_dir, prog="hearth-gateway")
    audit = _command(
        sub,
        "audit",
        "decisions and refusals: grants, installs, removals",
        "hearth-gateway audit --since 2h --kind task",
    )
    _state_dir(audit)
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.add_argument(
        "--limit", type=int, default=100, metavar="N", help="newest N entries (default 100)"
    )
    audit.add_argument(
        "--since",
        metavar="WHEN",
        help="entries since a time ago (30s, 10m, 2h, 7d) or a local date/time (2026-12-03 21:00)",
    )
    audit.add_argument(
        "--kind",
        action="append",
        metavar="ACTION",
        help="only this action (pair, device_revoke, job, task_install...); a prefix before _ "
        "takes its family (task: every task_*); repeatable",
    )
    pair = _command(
        sub,
        "pair",
        "print a one-time code for `hearth pair` on a device",
        "hearth-gateway pair --ttl 600",
    )
    _state_dir(pair)
    pair.add_argument("--ttl", type=float, metavar="S", help="valid this long (default 300 s)")
    pair.add_argument("--json", action="store_true", help="print JSON")
    _add_peers(sub, pair)
    devices = _command(
        sub, "devices", "paired devices: list, revoke", "hearth-gateway devices revoke cam-1"
    )
    verbs = devices.add_subparsers(dest="devices_command", required=True, metavar="VERB")
    listing = _command(
        verbs,
        "list",
        "every certificate issued, revoked ones too",
        "hearth-gateway devices list --json",
    )
    _state_dir(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    revoke = _command(
        verbs, "revoke", "lock a device out now (no restart)", "hearth-gateway devices revoke cam-1"
    )
    revoke.add_argument("device_id", help="the device's id, as devices list shows it")
    _grant_commands(verbs, revoke)
    doctor = _command(
        sub,
        "doctor",
        "check what this box enforces (IP filters, sandbox, key, listeners)",
        "sudo hearth-gateway doctor --json",
    )
    _state_dir(doctor)
    doctor.add_argument(
        "--unit",
        default="hearth-gateway.service",
        metavar="UNIT",
        help="the systemd service (default hearth-gateway.service)",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON")
    _web_commands(sub, run)
    add_completion_command(_usage_command(sub), "hearth-gateway")
    return parser


def _tasks(args: argparse.Namespace) -> int:
    import hashlib

    from hearth.protocol import (
        BlobChunk,
        Error,
        Task,
        TaskControl,
        TaskInstall,
        TaskList,
        TaskListResult,
        encode,
    )
    from hearth_gateway.control import call

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    sock = state_dir / "control.sock"
    if not sock.exists():
        print(f"no running gateway with state dir {state_dir}", file=sys.stderr)
        return EXIT_NO_GATEWAY
    verb = args.task_command
    if verb == "install":
        options = install_options(args)
        data = Path(args.module).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        chunk = 1 << 20
        for offset in range(0, max(len(data), 1), chunk):
            part = BlobChunk(
                sha256=sha,
                size=len(data),
                offset=offset,
                data=data[offset : offset + chunk],
                data_class=options["data_class"],
            )
            reply = call(sock, encode(part))
            if isinstance(reply, Error):
                print(
                    f"hearth-gateway: upload refused: {reply.code}: {reply.message}",
                    file=sys.stderr,
                )
                return 1
        request: TaskInstall | TaskList | TaskControl = task_install_request(
            sha, args.name, **options
        )
    elif verb == "list":
        request = TaskList()
    else:
        request = TaskControl(task_id=args.task_id, action=verb)
    reply = call(sock, encode(request))
    if isinstance(reply, Error):
        print(f"hearth-gateway: {reply.code}: {reply.message}", file=sys.stderr)
        return 1
    if isinstance(reply, TaskListResult):
        print_result(list(reply.tasks), getattr(args, "json", False))
    elif isinstance(reply, Task):
        print_result(reply.task, getattr(args, "json", False))
    return 0


def _audit(args: argparse.Namespace) -> int:
    import datetime as dt

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    path = state_dir / "hearth.sqlite3"
    if not path.exists():
        print(f"no gateway state in {state_dir}", file=sys.stderr)
        return 1
    try:
        since = _since(args.since) if args.since else None
    except ValueError as exc:
        print(f"hearth-gateway: --since: {exc}", file=sys.stderr)
        return 2
    from hearth_gateway.audit_log import AuditFilter, read_audit

    rows = read_audit(path, AuditFilter(limit=args.limit, since=since, kinds=args.kind or []))
    columns = ["at", "actor", "action", "target", "decision", "reason"]
    for row in reversed(rows):
        if args.json:
            print(msgspec.json.encode(dict(zip(columns, row, strict=True))).decode())
            continue
        at, actor, action, target, decision, reason = row
        when = dt.datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        because = f"  ({reason})" if reason else ""
        print(f"{when}  {decision:<8} {actor:<16} {action:<16} {target}{because}")
    return 0


_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> float:
    """Unix seconds from ``10m``-style ages or an ISO date/time (local time)."""
    import datetime as dt
    import time

    text = text.strip()
    if text[-1:] in _UNITS_S and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * _UNITS_S[text[-1]]
    try:
        return dt.datetime.fromisoformat(text).astimezone().timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is neither an age (30s, 10m, 2h, 7d) nor a date") from None


def _usage(args: argparse.Namespace) -> int:
    import time

    from hearth_gateway.quota import UsageFile, usage_rows, utc_day

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    path = state_dir / "hearth.sqlite3"
    if not path.exists():
        print(f"no gateway state in {state_dir}", file=sys.stderr)
        return 1
    source = UsageFile(path)
    try:
        rows = usage_rows(source, args.day or utc_day(time.time()))
    finally:
        source.close()
    for row in rows:
        if args.json:
            print(msgspec.json.encode(row).decode())
        else:
            print(
                f"{row.client_id:<20} {row.app:<16} {row.cpu_s:>10.3f} cpu-s  {row.jobs:>6} jobs"
                f"  {row.stored_bytes:>12} bytes  {row.tasks:>4} tasks  ({row.day} UTC)"
            )
    return 0


def _web_token(args: argparse.Namespace) -> int:
    from hearth_gateway.web import web_token

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    print(web_token(state_dir, new=args.new))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from hearth_gateway.doctor import doctor_command

    return doctor_command(args)


def _add_peers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], pair: argparse.ArgumentParser
) -> None:
    from hearth_gateway._peers_cli import add_peers_parser

    add_peers_parser(sub, _command, _state_dir, pair)


def _pairing(args: argparse.Namespace) -> int:
    from hearth_gateway._pairing_cli import pairing_command

    return pairing_command(args)


def _peers(args: argparse.Namespace) -> int:
    from hearth_gateway._peers_cli import peers_command

    return peers_command(args)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    autocomplete(parser)
    args = parser.parse_args(argv)
    if args.command == "completion":
        return print_shellcode("hearth-gateway", args.shell)
    commands = {
        "audit": _audit,
        "tasks": _tasks,
        "pair": _pairing,
        "devices": _pairing,
        "peers": _peers,
        "doctor": _doctor,
        "usage": _usage,
        "web-token": _web_token,
    }
    if args.command in commands:
        return commands[args.command](args)
    if args.command == "status":
        state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
        snapshot = read_snapshot(state_dir)
        if snapshot is None:
            print(f"no gateway has run with state dir {state_dir}", file=sys.stderr)
            return EXIT_NO_GATEWAY
        if args.json:
            print(msgspec.json.encode(snapshot).decode())
        else:
            print(format_status(snapshot))
        return 0 if snapshot.state == "online" else 3
    configure_logging(verbose=args.verbose)  # for the journal under systemd (_logging.py)
    from hearth_gateway.daemon import Gateway  # heavy imports only for `run`

    try:
        config = load_config(args.config)
        overrides = {
            "state_dir": args.state_dir,
            "listen": args.listen,
            "broker": args.broker,
            "mdns_interface": args.mdns_interface,
            "mdns_name": args.mdns_name,
            "gateway_id": args.gateway_id,
            "lan_listen": args.lan_listen,
            "pairing_listen": args.pairing_listen,
            "web_listen": args.web_listen,
            "workers": args.workers,
            "tier": args.tier,
            "pool": args.pool,
            "upstream": args.upstream,
            "upstream_gateway_id": args.upstream_gateway_id,
            "upstream_ca": args.upstream_ca,
            "upstream_cert": args.upstream_cert,
            "upstream_key": args.upstream_key,
        }
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        if args.no_mdns:
            config.mdns = False
        config.policies = [*config.policies, *args.policy]
        gateway = Gateway(config)
        return gateway.run_forever()
    except GatewayError as exc:
        logging.getLogger("hearth_gateway").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
