"""``hearth``: the device-side command line.

    hearth discover [--json] [--interface IP] [--timeout S]
    hearth run [--where auto|edge|local] [--explain] MODULE.wasm [ARGS...]   (stdin -> stdout)
    hearth run --migratable [--checkpoint-to FILE] ... MODULE.wasm [ARGS...]  (a run that moves)
    hearth migrate RUN_ID --to edge|local
    hearth resume SNAPSHOT --module MODULE.wasm [--where auto|edge|local]
    hearth infer MODEL.onnx --input NAME=FILE.npy ... --out DIR
    hearth tasks install|list|show|pause|resume|cancel ...
    hearth notifications [--for S] [--json]
    hearth call CAPABILITY [--image FILE] [--param KEY=VALUE ...] [--json]
    hearth pair CODE [--gateway HOST:PORT] [--ca-fingerprint HEX] [--id DEVICE_ID]

Every command that looks for a gateway takes --gateway HOST:PORT (no discovery) and
--interface IP (discover only there); $HEARTH_GATEWAY and $HEARTH_INTERFACE do the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hearth import __version__
from hearth._gateway import ENV_GATEWAY, ENV_INTERFACE
from hearth._identity import ENV_CLIENT_ID
from hearth._runs_cli import (
    add_migrate_command,
    add_resume_command,
    add_run_options,
    migrate,
    resume,
    run_migratable,
)
from hearth._tasks_cli import add_task_commands, install_options, print_result
from hearth._trust import pair_command
from hearth.client import Client
from hearth.discovery import GatewayInfo, discover
from hearth.errors import HearthError, JobError

__all__ = ["main"]


def _gateway_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        default=os.environ.get(ENV_GATEWAY),
        help=f"use this gateway's broker, no discovery (${ENV_GATEWAY})",
    )
    parser.add_argument(
        "--interface",
        metavar="IP",
        default=os.environ.get(ENV_INTERFACE),
        help=f"discover on this interface only (${ENV_INTERFACE})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the gateway per attempt (default 10)",
    )
    parser.add_argument(
        "--client-id",
        default=os.environ.get(ENV_CLIENT_ID),
        help=f"this device's id (${ENV_CLIENT_ID}; default dev-HOSTNAME)",
    )


def _client(args: argparse.Namespace, placement: str = "auto") -> Client:
    """A client as the gateway options (``_gateway_options``) say."""
    return Client(
        args.gateway,
        interface=args.interface,
        timeout_s=args.timeout,
        client_id=args.client_id,
        placement=placement,
    )


_RUN_EPILOG = """\
examples:
  hearth run filter.wasm edges < frame.pgm > edges.pgm
  hearth run --migratable --explain hashchain.wasm 200 < data > out
      # a run that can move: SIGUSR1 (or `hearth migrate RUN_ID --to edge`) sends it to the
      # gateway, SIGUSR2 brings it back; a gateway that stops sends it back by itself
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="Hearth device SDK")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("discover", help="list gateways on the LAN with measured round trips")
    d.add_argument("--json", action="store_true")
    d.add_argument("--interface", metavar="IP", default=os.environ.get(ENV_INTERFACE))
    d.add_argument(
        "--timeout",
        type=float,
        default=1.5,
        metavar="S",
        help="seconds to listen for answers (default 1.5)",
    )

    r = sub.add_parser(
        "run",
        help="run a WASI module here or on a gateway, like `wasmtime run`",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _gateway_options(r)
    r.add_argument("--where", choices=["auto", "edge", "local"], default="auto")
    r.add_argument("--explain", action="store_true", help="print where it ran and why to stderr")
    add_run_options(r)
    r.add_argument("module", type=Path)
    r.add_argument("args", nargs=argparse.REMAINDER)
    add_migrate_command(sub)
    add_resume_command(sub, _gateway_options)

    i = sub.add_parser("infer", help="run an ONNX model on .npy inputs")
    _gateway_options(i)
    i.add_argument("--where", choices=["auto", "edge", "local"], default="auto")
    i.add_argument("--explain", action="store_true")
    i.add_argument("model", type=Path)
    i.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", required=True)
    i.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="writes NAME.npy per output"
    )
    t = sub.add_parser("tasks", help="persistent tasks on the gateway, owned by this device")
    add_task_commands(t, _gateway_options)
    n = sub.add_parser(
        "notifications",
        help="print this device's task notifications, including those sent while it was away",
    )
    _gateway_options(n)
    n.add_argument(
        "--for",
        dest="for_s",
        type=float,
        metavar="S",
        help="stop after S seconds (default: until Ctrl-C)",
    )
    n.add_argument("--json", action="store_true")
    c = sub.add_parser("call", help="call a gateway capability (vision.faces, vision.plate...)")
    _gateway_options(c)
    c.add_argument("capability", help="e.g. vision.faces (hearth discover lists them)")
    c.add_argument("--image", type=Path, metavar="FILE", help="a JPEG or PNG file")
    c.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a capability parameter; numbers, true/false and comma-separated number lists "
        "are typed",
    )
    c.add_argument("--stream", help="the frame belongs to this camera stream")
    c.add_argument("--session", help="the frame belongs to this session (vision.odometry)")
    c.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p = sub.add_parser(
        "pair",
        help="pair with a gateway using the code `hearth-gateway pair` "
        "printed; stores this device's certificate",
    )
    p.add_argument("code", help="the one-time code, e.g. 7KQ2-M9XD-3FHA")
    p.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        help="the gateway's pairing listener (default: find it over mDNS)",
    )
    p.add_argument(
        "--ca-fingerprint", metavar="HEX", help="the gateway CA's SHA-256 (default: from mDNS)"
    )
    p.add_argument(
        "--id",
        dest="device_id",
        default=os.environ.get(ENV_CLIENT_ID),
        help=f"pair as this device id (${ENV_CLIENT_ID}; default dev-HOSTNAME)",
    )
    p.add_argument("--interface", metavar="IP", default=os.environ.get(ENV_INTERFACE))
    p.add_argument("--timeout", type=float, default=10.0, metavar="S")
    return parser


def _pair(args: argparse.Namespace) -> int:
    from hearth.pairing import pair

    paired = pair(
        args.code,
        args.gateway,
        ca_fingerprint=args.ca_fingerprint,
        device_id=args.device_id,
        interface=args.interface,
        timeout_s=args.timeout,
    )
    print(
        f"paired with {paired.gateway_id} as {paired.device_id}; it serves this device at "
        f"{paired.address} (TLS); credentials in {paired.directory}"
    )
    return 0


def _param(text: str) -> str | int | float | bool | list[float]:
    """A --param value, typed the way a person would expect from the command line."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if "," in text:
        try:
            return [float(part) for part in text.split(",")]
        except ValueError:
            pass
    return text


def _call(args: argparse.Namespace) -> int:
    import msgspec

    params = {}
    for spec in args.param:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise SystemExit(f"hearth call: --param wants KEY=VALUE, got {spec!r}")
        params[key] = _param(value)
    image = args.image.read_bytes() if args.image is not None else None
    with _client(args, placement="edge") as client:
        call = client.call(args.capability, image, params, stream=args.stream, session=args.session)
    result = msgspec.to_builtins(call.result)
    if args.json:
        whole = {
            "capability": call.capability,
            "version": call.version,
            "gateway": call.gateway_id,
            "latency_ms": round(call.latency_ms, 2),
            "result": result,
        }
        print(json.dumps(whole, indent=2))
        return 0
    if isinstance(result, dict) and isinstance(result.get("descriptors"), str):
        result["descriptors"] = f"<{len(result.get('keypoints', []))} x 32 bytes>"
    print(json.dumps(result, indent=2))
    print(
        f"hearth: {call.capability} {call.version} on {call.gateway_id} in "
        f"{call.latency_ms:.1f} ms",
        file=sys.stderr,
    )
    return 0


def _tasks(args: argparse.Namespace) -> int:
    with _client(args, placement="edge") as client:
        verb = args.task_command
        if verb == "install":
            task = client.install_task(args.module, args.name, **install_options(args))
            print_result(task, False)
        elif verb == "list":
            print_result(client.tasks(), args.json)
        else:
            print_result(client.task(args.task_id, verb), args.json)
    return 0


def _notifications(args: argparse.Namespace) -> int:
    import datetime as dt
    import threading

    import msgspec

    from hearth.protocol import Notification

    done = threading.Event()

    def show(note: Notification) -> None:
        if args.json:
            print(msgspec.json.encode(note).decode(), flush=True)
        else:
            when = dt.datetime.fromtimestamp(note.at).astimezone().strftime("%H:%M:%S")
            print(f"{when}  {note.name} ({note.task_id}): {note.message}", flush=True)

    with _client(args, placement="edge") as client:
        stop = client.notifications(show)
        try:
            done.wait(args.for_s)
        except KeyboardInterrupt:
            pass
        finally:
            stop()
    return 0


def _discover(args: argparse.Namespace) -> int:
    gateways = discover(args.timeout, interface=args.interface)
    if args.json:
        print(json.dumps([g.to_dict() for g in gateways], indent=2))
        return 0
    if not gateways:
        print("no gateways found", file=sys.stderr)
        return 1
    header = f"{'GATEWAY':<20} {'BROKER':<22} {'RTT':>8}  {'LOAD':>5}  {'PAIRING':<10}"
    print(f"{header}  RUNNERS / ACCELERATORS")
    for g in gateways:
        rtt = "-" if g.rtt_ms is None else f"{g.rtt_ms:.2f}ms"
        print(
            f"{g.gateway_id:<20} {g.broker!s:<22} {rtt:>8}  {g.load:>5.2f}  {_pairing(g):<10}  "
            f"{','.join(g.runners)} / {','.join(g.accelerators)}"
        )
    for g in gateways:
        if g.ca_changed:
            print(_ca_warning(g), file=sys.stderr)
    return 0


def _pairing(gateway: GatewayInfo) -> str:
    if not gateway.tls:
        return "-"  # a plain listener: no pairing involved
    if gateway.ca_changed:
        return "CA CHANGED"
    return "paired" if gateway.paired else "unpaired"


def _ca_warning(gateway: GatewayInfo) -> str:
    command = pair_command(gateway.broker.host, gateway.pairing_port, gateway.ca_fingerprint)
    return (
        f"hearth: warning: gateway {gateway.gateway_id} advertises a CA with fingerprint "
        f"{gateway.ca_fingerprint}, not the one this device pinned when it paired "
        f"({gateway.pinned_ca_fingerprint}): its identity changed (its state directory was lost "
        "or replaced) or another machine uses its name. This device will not connect to it. If "
        f"the gateway was reinstalled, pair again: {command}"
    )


def _run(args: argparse.Namespace) -> int:
    if args.migratable:
        return run_migratable(args, _client)
    if args.checkpoint_to is not None:
        raise SystemExit("hearth run: --checkpoint-to is for --migratable runs")
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    with _client(args) as client:
        run = client.run_wasm(args.module, stdin=stdin, args=args.args, where=args.where)
        _pairing_note(client)
    sys.stdout.buffer.write(run.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(run.stderr)
    if args.explain:
        where = f"{run.where} ({run.gateway_id})" if run.gateway_id else run.where
        print(
            f"hearth: ran on {where} in {run.latency_ms:.1f} ms: {run.reason or 'as asked'}",
            file=sys.stderr,
        )
    return run.exit_code


def _pairing_note(client: Client) -> None:
    """Said whenever a gateway was found that this device must pair with first, even when the
    call ran here instead."""
    needed = client.pairing_needed
    if needed is not None:
        print(f"hearth: {needed}", file=sys.stderr)


def _resume(args: argparse.Namespace) -> int:
    return resume(args, _client)


def _infer(args: argparse.Namespace) -> int:
    import numpy as np

    inputs = {}
    for spec in args.input:
        name, sep, file = spec.partition("=")
        if not sep:
            raise SystemExit(f"hearth infer: --input wants NAME=FILE.npy, got {spec!r}")
        inputs[name] = np.load(file, allow_pickle=False)
    with _client(args) as client:
        result = client.infer(args.model, inputs, where=args.where)
        _pairing_note(client)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, value in result.outputs.items():
        np.save(args.out / f"{name}.npy", value, allow_pickle=False)
        print(f"{name}: {value.dtype} {list(value.shape)} -> {args.out / (name + '.npy')}")
    if args.explain:
        print(
            f"hearth: ran on {result.where} ({result.provider}) in {result.latency_ms:.1f} ms: "
            f"{result.reason or 'as asked'}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "discover": _discover,
        "run": _run,
        "infer": _infer,
        "tasks": _tasks,
        "notifications": _notifications,
        "call": _call,
        "pair": _pair,
        "migrate": migrate,
        "resume": _resume,
    }
    try:
        return commands[args.command](args)
    except JobError as exc:
        print(f"hearth: job failed ({exc.where}): {exc.code}: {exc.message}", file=sys.stderr)
        return 125
    except (HearthError, OSError) as exc:
        print(f"hearth: {exc}", file=sys.stderr)
        return 125


if __name__ == "__main__":
    sys.exit(main())
