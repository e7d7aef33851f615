"""``hearth-gateway pair`` and ``hearth-gateway devices list|revoke``: the owner's side of
pairing, spoken to the running daemon over its control socket (so a revocation takes effect in
the daemon and its broker at once)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import msgspec

from hearth.protocol import Error
from hearth.transport import BrokerAddress
from hearth_gateway.config import default_state_dir
from hearth_gateway.control import call_admin
from hearth_gateway.owner import (
    AdminRequest,
    CodeIssued,
    CodeRequest,
    DeviceGrant,
    DeviceGrantList,
    DeviceGrantsRequest,
    DeviceList,
    DeviceListRequest,
    DeviceRevoke,
    DeviceRevoked,
)

__all__ = ["pairing_command"]


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return dt.datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _print_grants(reply: DeviceGrantList, json_out: bool) -> None:
    for device_id, publish, subscribe in reply.grants:
        if json_out:
            entry = {"device_id": device_id, "publish": publish, "subscribe": subscribe}
            print(msgspec.json.encode(entry).decode())
        else:
            print(f"{device_id:<24} publish: {' '.join(publish) or '-'}")
            print(f"{'':<24} subscribe: {' '.join(subscribe) or '-'}")


def pairing_command(args: argparse.Namespace) -> int:  # noqa: PLR0911, PLR0912 - one branch per reply
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    sock = state_dir / "control.sock"
    if not sock.exists():
        print(f"no running gateway with state dir {state_dir}", file=sys.stderr)
        return 3  # as `hearth-gateway`'s other commands: no gateway
    request: AdminRequest
    if args.command == "pair":
        request = CodeRequest(ttl_s=args.ttl, peer=getattr(args, "peer", False))
    elif args.devices_command == "list":
        request = DeviceListRequest()
    elif args.devices_command in ("grant", "ungrant"):
        if args.devices_command == "grant" and not (args.publish or args.subscribe):
            print("hearth-gateway: grant what? --publish or --subscribe", file=sys.stderr)
            return 2
        request = DeviceGrant(
            device_id=args.device_id,
            publish=args.publish,
            subscribe=args.subscribe,
            revoke=args.devices_command == "ungrant",
        )
    elif args.devices_command == "grants":
        request = DeviceGrantsRequest()
    else:
        request = DeviceRevoke(device_id=args.device_id)
    reply = call_admin(sock, request)
    if isinstance(reply, Error):
        print(f"hearth-gateway: {reply.code}: {reply.message}", file=sys.stderr)
        return 1
    json_out = getattr(args, "json", False)
    if isinstance(reply, CodeIssued):
        if json_out:
            print(msgspec.json.encode(reply).decode())
            return 0
        minutes = max(0.0, reply.expires_at - dt.datetime.now().timestamp()) / 60
        print(f"Pairing code:    {reply.code}")
        print(f"Valid for:       {minutes:.0f} min, once")
        print(f"CA fingerprint:  {reply.ca_fingerprint}")
        if reply.peer:  # for another gateway, not a device
            for host in reply.addresses or ["HOST"]:
                where = BrokerAddress(host, reply.pairing_port)
                print(f"On the other gateway: hearth-gateway peers pair {reply.code} "
                      f"--gateway {where} --ca-fingerprint {reply.ca_fingerprint}")  # fmt: skip
            return 0
        # One line per address the listener is reachable at (a box on two networks has two).
        for n, host in enumerate(reply.addresses or ["HOST"]):
            where = BrokerAddress(host, reply.pairing_port)
            print(
                f"{'On the device:' if n == 0 else 'or:':<17}hearth pair {reply.code} "
                f"--gateway {where} --ca-fingerprint {reply.ca_fingerprint}"
            )
        print(f"                 (or just `hearth pair {reply.code}` where mDNS finds the gateway)")
    elif isinstance(reply, DeviceList):
        if json_out:
            for device in reply.devices:
                print(msgspec.json.encode(device).decode())
            return 0
        print(f"{'DEVICE':<24} {'STATE':<10} {'PAIRED':<19}  {'REVOKED':<19}  SERIAL")
        for d in reply.devices:
            state = "valid" if d.revoked_at is None else (d.reason.split()[0] or "revoked")
            print(
                f"{d.device_id:<24} {state:<10} {_when(d.paired_at):<19}  "
                f"{_when(d.revoked_at):<19}  {d.serial}"
            )
    elif isinstance(reply, DeviceGrantList):
        _print_grants(reply, json_out)
    elif isinstance(reply, DeviceRevoked):
        print(
            f"revoked {reply.device_id}: certificate(s) {', '.join(reply.serials)}; "
            "its connections can no longer publish or receive"
        )
    return 0
