"""``hearth-gateway``: run the daemon, or look at it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import msgspec

from hearth_gateway.config import default_state_dir, load_config
from hearth_gateway.errors import GatewayError
from hearth_gateway.status import format_status, read_snapshot

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway daemon in the foreground")
    run.add_argument("--config", type=Path, help="TOML configuration file")
    run.add_argument(
        "--state-dir", help="where state lives (default: $STATE_DIRECTORY or ~/.local/state/hearth)"
    )
    run.add_argument(
        "--listen", metavar="HOST:PORT", help="managed broker listener (default 127.0.0.1:1883)"
    )
    run.add_argument("--broker", metavar="URL", help="use an external MQTT 5 broker instead")
    run.add_argument("--mdns-interface", metavar="IP", help="advertise on this interface only")
    run.add_argument("--no-mdns", action="store_true", help="do not advertise over mDNS")
    run.add_argument("--gateway-id", help="gateway id (default: the host name)")
    run.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    run.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="FILE",
        help="policy TOML merged over the defaults (repeatable)",
    )
    run.add_argument("-v", "--verbose", action="store_true")
    status = sub.add_parser("status", help="show the gateway's state")
    status.add_argument("--state-dir", help="the daemon's state directory")
    status.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
        snapshot = read_snapshot(state_dir)
        if snapshot is None:
            print(f"no gateway has run with state dir {state_dir}", file=sys.stderr)
            return 1
        if args.json:
            print(msgspec.json.encode(snapshot).decode())
        else:
            print(format_status(snapshot))
        return 0 if snapshot.state == "online" else 3
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from hearth_gateway.daemon import Gateway  # heavy imports only for `run`

    try:
        config = load_config(args.config)
        overrides = {
            "state_dir": args.state_dir,
            "listen": args.listen,
            "broker": args.broker,
            "mdns_interface": args.mdns_interface,
            "gateway_id": args.gateway_id,
            "workers": args.workers,
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
