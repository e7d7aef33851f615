# PYTHON_ARGCOMPLETE_OK (argcomplete: this command completes itself; hearth._completion)
"""``hearth``: the device-side command line.

    hearth discover [--json] [--interface IP] [--timeout S]
    hearth run [--where auto|edge|local] [--public] [--explain] MODULE.wasm [ARGS...] < in > out
    hearth run --migratable [--checkpoint-to FILE] ... MODULE.wasm [ARGS...]  (a run that moves)
    hearth migrate RUN_ID --to edge|local
    hearth resume SNAPSHOT --module MODULE.wasm [--where auto|edge|local]
    hearth infer MODEL.onnx --input NAME=FILE.npy ... --out DIR
    hearth tasks install|list|show|pause|resume|cancel ...
    hearth notifications [--for S] [--json]
    hearth call CAPABILITY [--image FILE] [--param KEY=VALUE ...] [--json]
    hearth describe MODEL.onnx|MODULE.wasm [--json]  (inputs/outputs, imports/exports)
    hearth pair CODE [--gateway ID|HOST:PORT] [--ca-fingerprint HEX] [--id DEVICE_ID]
    hearth completion bash|zsh|fish                 (tab completion, with argcomplete)

Every command that looks for a gateway takes --gateway ID, HOST:PORT or ID@HOST:PORT (no
discovery for a paired gateway whose last address answers; ID@HOST:PORT names a gateway id on
that broker, such as a cloud-tier pool's) and --interface IP (discover only there);
$HEARTH_GATEWAY and $HEARTH_INTERFACE do the same. Without --gateway, the paired gateway that
answered quickest last time is used if its last address still answers, else discovery.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

import msgspec

import hearth
from hearth._completion import add_completion_command, autocomplete, print_shellcode
from hearth._gateway import ENV_GATEWAY, ENV_INTERFACE
from hearth._identity import ENV_CLIENT_ID
from hearth._progress import DownloadBar, UploadBars, on_terminal
from hearth._runs_cli import (
    add_migrate_command,
    add_resume_command,
    add_run_options,
    migrate,
    resume,
    run_migratable,
)
from hearth._tasks_cli import add_task_commands, install_options, list_everywhere, print_result
from hearth._trust import pair_command
from hearth.client import Client
from hearth.discovery import GatewayInfo, discover
from hearth.errors import (
    GatewayUnavailable,
    HearthError,
    JobError,
    NotPaired,
    RequirementsError,
)
from hearth.pairing import PairingError
from hearth.protocol import DataClass

__all__ = ["EXIT_JOB_FAILED", "EXIT_NO_GATEWAY", "EXIT_PAIRING", "EXIT_USAGE", "main"]

# The exit codes (README.md, "Exit codes"): `hearth run` and `hearth resume` otherwise exit
# with the module's own code, as `wasmtime run` does; 125 follows `docker run` for "the
# command failed, not the program it ran".
EXIT_USAGE = 2
EXIT_NO_GATEWAY = 3
EXIT_PAIRING = 4
EXIT_JOB_FAILED = 125

_DESCRIPTION = """\
Hearth device SDK: find home-edge gateways, run WebAssembly modules and ONNX models on them
(or here), pair with them.

Every command that looks for a gateway takes --gateway ID, HOST:PORT or ID@HOST:PORT (no
discovery for a paired gateway whose last address answers; ID@HOST:PORT names a gateway id on
that broker, such as a cloud-tier pool's) and --interface IP (discover only there);
$HEARTH_GATEWAY and $HEARTH_INTERFACE do the same. Without --gateway, the paired gateway that
answered quickest last time is used if its last address still answers, else discovery.
"""

_EXIT_CODES = """\
examples:
  hearth discover
  hearth run filter.wasm edges < frame.pgm > edges.pgm
  hearth pair xajc ver7 xaz3

exit codes:
  0    success (hearth run / resume: the module's own exit code instead)
  2    usage error (a bad option or argument)
  3    no gateway reachable (or none found by hearth discover)
  4    pairing failed, or this device must pair with the gateway first
  125  the job failed (a trap, a bad module, a refusal), or hearth itself did
  130  interrupted (Ctrl-C)
"""


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_: str,
    example: str,
) -> argparse.ArgumentParser:
    """A sub-command whose --help ends with its example(s), kept as written."""
    return sub.add_parser(
        name,
        help=help_,
        description=textwrap.fill(help_[:1].upper() + help_[1:] + "."),
        epilog=example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _gateway_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gateway",
        metavar="ID|HOST:PORT|ID@HOST:PORT",
        default=os.environ.get(ENV_GATEWAY),
        help="this gateway: its id (a paired one at its last address, else found over mDNS), "
        f"its broker's address, or an id on that broker, a pool's say (${ENV_GATEWAY})",
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
        metavar="ID",
        help=f"this device's id (${ENV_CLIENT_ID}; default dev-HOSTNAME)",
    )
    parser.add_argument(
        "--app",
        default=os.environ.get("HEARTH_APP"),
        metavar="NAME",
        help="the application this is for: its quotas on the gateway ($HEARTH_APP; "
        "default: the device's id)",
    )


class _ShellClient(Client):
    """A client that draws progress bars on a terminal: uploads of modules and models, and
    downloads of results and snapshots, over ``PROGRESS_MIN_BYTES`` (hearth._progress)."""

    _download: DownloadBar | None = None

    def show_progress(self) -> None:
        self.upload_progress = UploadBars().callback
        self._download = DownloadBar(self.receiving)

    def close(self) -> None:
        super().close()
        if self._download is not None:
            self._download.close()


def _client(args: argparse.Namespace, placement: str = "auto") -> Client:
    """A client as the gateway options (``_gateway_options``) say, drawing progress bars for
    large uploads and downloads when stderr is a terminal."""
    client = _ShellClient(
        args.gateway,
        interface=args.interface,
        timeout_s=args.timeout,
        client_id=args.client_id,
        placement=placement,
        app=args.app,
        requires=_requires(getattr(args, "requires", [])),
        local=not getattr(args, "no_local", False),
    )
    if on_terminal():
        client.show_progress()
    return client


_RUN_EPILOG = """\
examples:
  hearth run filter.wasm edges < frame.pgm > edges.pgm
  hearth run --migratable --explain hashchain.wasm 200 < data > out
      # a run that can move: SIGUSR1 (or `hearth migrate RUN_ID --to edge`) sends it to the
      # gateway, SIGUSR2 brings it back; a gateway that stops sends it back by itself
"""


class _Version(argparse.Action):
    """``--version``, the version read only when asked for (hearth.__getattr__)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"{parser.prog} {hearth.__version__}")  # on stdout, as argparse's own does
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hearth",
        description=_DESCRIPTION,
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = _command(
        sub,
        "discover",
        "list gateways on the LAN with measured round trips",
        "example:\n  hearth discover --interface 192.168.1.10 --json\n",
    )
    d.add_argument("--json", action="store_true", help="print a JSON list")
    d.add_argument(
        "--interface",
        metavar="IP",
        default=os.environ.get(ENV_INTERFACE),
        help=f"discover on this interface only (${ENV_INTERFACE})",
    )
    d.add_argument(
        "--timeout",
        type=float,
        default=1.5,
        metavar="S",
        help="seconds to listen for answers (default 1.5)",
    )

    r = _command(
        sub, "run", "run a WASI module here or on a gateway, like `wasmtime run`", _RUN_EPILOG
    )
    _gateway_options(r)
    _where_options(r)
    add_run_options(r)
    r.add_argument(
        "--public",
        action="store_true",
        help="label the module and stdin public: a cloud-tier gateway or pool may run it "
        "(without it the work is private and never leaves the LAN)",
    )
    r.add_argument("module", type=Path, help="the WebAssembly module (.wasm)")
    r.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the module")
    add_migrate_command(sub)
    add_resume_command(sub, _gateway_options)

    i = _command(
        sub,
        "infer",
        "run an ONNX model on .npy inputs",
        "example:\n  hearth infer digits.onnx --input input=x.npy --out results/\n",
    )
    _gateway_options(i)
    _where_options(i)
    i.add_argument("model", type=Path, help="the ONNX model (.onnx)")
    i.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        required=True,
        help="the model input NAME from a NumPy file (repeatable)",
    )
    i.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="writes NAME.npy per output"
    )
    t = _command(
        sub,
        "tasks",
        "persistent tasks on the gateway, owned by this device",
        "example:\n  hearth tasks install indexer.wasm --name primes --every 60\n"
        "  hearth tasks list\n",
    )
    add_task_commands(t, _gateway_options, prog="hearth")
    n = _command(
        sub,
        "notifications",
        "print this device's task notifications, including those sent while it was away",
        "example:\n  hearth notifications --for 60\n",
    )
    _gateway_options(n)
    n.add_argument(
        "--for",
        dest="for_s",
        type=float,
        metavar="S",
        help="stop after S seconds (default: until Ctrl-C)",
    )
    n.add_argument("--json", action="store_true", help="one JSON object per line")
    c = _command(
        sub,
        "call",
        "call a gateway capability (vision.faces, vision.plate...)",
        "example:\n  hearth call vision.faces --image door.jpg --param min_size=40\n",
    )
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
    c.add_argument("--stream", metavar="ID", help="the frame belongs to this camera stream")
    c.add_argument(
        "--session", metavar="ID", help="the frame belongs to this session (vision.odometry)"
    )
    c.add_argument("--json", action="store_true", help="print the whole result as JSON")
    ds = _command(
        sub,
        "describe",
        "show an ONNX model's inputs and outputs or a WebAssembly module's imports and "
        "exports, as the gateway reads them",
        "examples:\n  hearth describe digits.onnx\n  hearth describe filter.wasm --json\n",
    )
    _gateway_options(ds)
    ds.add_argument("file", type=Path, help="the model (.onnx) or module (.wasm)")
    ds.add_argument("--json", action="store_true", help="print the answer as JSON")
    p = _command(
        sub,
        "pair",
        "pair with a gateway using the code `hearth-gateway pair` printed; stores this "
        "device's certificate",
        "examples:\n  hearth pair XAJC-VER7-XAZ3\n"
        "  hearth pair xajc ver7 xaz3 --gateway 192.168.1.20:8884 --ca-fingerprint 3f1c...\n",
    )
    p.add_argument(
        "code",
        nargs="+",
        help="the one-time code, as printed: with dashes or spaces, in any case",
    )
    p.add_argument(
        "--gateway",
        metavar="ID|HOST:PORT",
        help="the gateway's id (found over mDNS, with its CA fingerprint) or its pairing "
        "listener (default: the one gateway mDNS finds)",
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
    p.add_argument(
        "--interface",
        metavar="IP",
        default=os.environ.get(ENV_INTERFACE),
        help=f"discover on this interface only (${ENV_INTERFACE})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the gateway (default 10)",
    )
    add_completion_command(_usage_command(sub), "hearth")
    return parser


def _usage_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """``usage``; returns ``sub`` for the next command."""
    u = _command(
        sub,
        "usage",
        "this device's usage of the gateway today (UTC), by application: what quotas count",
        "example:\n  hearth usage --json\n",
    )
    _gateway_options(u)
    u.add_argument("--json", action="store_true", help="one JSON object per line")
    return sub


def _usage(args: argparse.Namespace) -> int:
    import msgspec

    with _client(args, placement="edge") as client:
        rows = client.usage()
    for row in rows:
        if args.json:
            print(msgspec.json.encode(row).decode())
        else:
            print(
                f"{row.app:<16} {row.cpu_s:>10.3f} cpu-s  {row.jobs:>6} jobs  "
                f"{row.stored_bytes:>12} bytes  {row.tasks:>4} tasks  ({row.day} UTC)"
            )
    return 0


def _where_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--where",
        choices=["auto", "edge", "local"],
        default="auto",
        help="edge: on the gateway; local: on this device; auto (default): where it is "
        "quicker, here when no gateway answers",
    )
    parser.add_argument(
        "--explain", action="store_true", help="print where it ran and why to stderr"
    )
    parser.add_argument(
        "--requires",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="what it needs of wherever it runs (repeatable): accelerator=gpu, memory_mb=512, "
        "capability=vision.plate, max_latency_ms=50 (docs/quotas.md)",
    )
    parser.add_argument(
        "--no-local",
        action="store_true",
        help="never on this device: wait for a gateway that qualifies, else fail unsatisfiable",
    )


def _requires(pairs: list[str]) -> dict[str, object] | None:
    """``--requires KEY=VALUE`` as a ``requires`` mapping (numbers as numbers); the SDK
    checks keys and values."""
    if not pairs:
        return None
    needs: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"hearth: --requires {pair!r}: expected KEY=VALUE")
        value: object = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        needs[key.strip()] = value
    return needs


def _pair(args: argparse.Namespace) -> int:
    from hearth.pairing import pair

    paired = pair(
        " ".join(args.code),  # as printed, in groups: normalize_code drops spaces and dashes
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
    source = "given" if args.ca_fingerprint else "from mDNS"
    print(
        f"gateway CA fingerprint ({source}, checked): {paired.ca_fingerprint}\n"
        "  compare it with the 'CA fingerprint' line `hearth-gateway pair` printed on the box"
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
    if args.task_command == "list" and not args.gateway:
        return list_everywhere(args, _client)
    with _client(args, placement="edge") as client:
        verb = args.task_command
        if verb == "install":
            task = client.install_task(args.module, args.name, **install_options(args))
            print_result(task, False, gateway=client.gateway_id)
        elif verb == "list":
            print_result(client.tasks(), args.json, gateway=client.gateway_id)
        else:
            print_result(client.task(args.task_id, verb), args.json, gateway=client.gateway_id)
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
            where = client.gateway_id or "-"  # tasks live on one gateway: say which
            print(f"{when}  {where}  {note.name} ({note.task_id}): {note.message}", flush=True)

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
        return EXIT_NO_GATEWAY
    # A gateway is its id and CA (two boxes may share a host name, and so an mDNS name).
    header = (
        f"{'GATEWAY':<20} {'CA':<12} {'BROKER':<22} {'RTT':>8}  {'LOAD':>5}  {'PAIRING':<10}  "
        f"{'MDNS NAME':<20}"
    )
    print(f"{header}  RUNNERS / ACCELERATORS")
    for g in gateways:
        rtt = "-" if g.rtt_ms is None else f"{g.rtt_ms:.2f}ms"
        print(
            f"{g.gateway_id:<20} {g.ca_fingerprint[:12] or '-':<12} {g.broker!s:<22} "
            f"{rtt:>8}  {g.load:>5.2f}  {_pairing(g):<10}  {g.instance:<20}  "
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
    if args.public and args.migratable:
        raise SystemExit("hearth run: --public is for plain runs, not --migratable ones")
    if args.migratable:
        return run_migratable(args, _client)
    if args.checkpoint_to is not None:
        raise SystemExit("hearth run: --checkpoint-to is for --migratable runs")
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    label: DataClass = "public" if args.public else "private"
    with _client(args) as client:
        run = client.run_wasm(
            args.module, stdin=stdin, args=args.args, where=args.where, data_class=label
        )
        _pairing_note(client)
        found, gateway = client.gateway_found, client.gateway_id
    sys.stdout.buffer.write(run.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(run.stderr)
    if args.explain:
        where = f"{run.where} ({run.gateway_id})" if run.gateway_id else run.where
        print(
            f"hearth: ran on {where} in {run.latency_ms:.1f} ms: {run.reason or 'as asked'}",
            file=sys.stderr,
        )
        if found:
            print(f"hearth: gateway {gateway}: {found}", file=sys.stderr)
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


def _describe(args: argparse.Namespace) -> int:
    with _client(args, placement="edge") as client:
        described = client.describe(args.file)
    if args.json:
        print(json.dumps(msgspec.to_builtins(described), indent=2))
        return 0
    if described.kind == "onnx":
        for heading, tensors in (("inputs", described.inputs), ("outputs", described.outputs)):
            print(f"{heading}:")
            for t in tensors:
                shape = ", ".join(str(d) if d != "" else "?" for d in t.shape)
                print(f"  {t.name}: {t.dtype} [{shape}]")
        return 0
    print("imports:")
    for imp in described.imports:
        print(f"  {imp.module}.{imp.name} ({imp.kind})")
    print("exports:")
    for exp in described.exports:
        print(f"  {exp.name} ({exp.kind})")
    return 0


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 - one return per exit code
    parser = _parser()
    autocomplete(parser)
    args = parser.parse_args(argv)
    if args.command == "completion":
        return print_shellcode("hearth", args.shell)
    commands = {
        "discover": _discover,
        "run": _run,
        "infer": _infer,
        "tasks": _tasks,
        "notifications": _notifications,
        "call": _call,
        "describe": _describe,
        "pair": _pair,
        "migrate": migrate,
        "resume": _resume,
        "usage": _usage,
    }
    try:
        return commands[args.command](args)
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        print(exc.code, file=sys.stderr)  # a value the parser could not check: a usage error
        return EXIT_USAGE
    except RequirementsError as exc:
        print(f"hearth: {exc}", file=sys.stderr)  # bad --requires or --app: nothing was sent
        return EXIT_USAGE
    except JobError as exc:
        print(f"hearth: job failed ({exc.where}): {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except (PairingError, NotPaired) as exc:
        print(f"hearth: {exc}", file=sys.stderr)
        return EXIT_PAIRING
    except GatewayUnavailable as exc:
        print(f"hearth: {exc}", file=sys.stderr)
        return EXIT_NO_GATEWAY
    except (HearthError, OSError) as exc:
        print(f"hearth: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
