"""``hearth-gateway peers pair|list|revoke``: this gateway's LAN peers (docs/peers.md).

``pair`` runs the device SDK's pairing against the other gateway's pairing listener, with the
id ``peer.{this gateway's id}`` and a peer code that gateway's owner printed
(``hearth-gateway pair --peer``), and keeps the credentials in ``state/peers/``; it refuses
a certificate that is not marked as a peer's. The daemon reads ``state/peers/`` at start.
``list`` shows those, and the peers paired with this gateway (its registry, when it runs);
``revoke ID`` forgets this gateway's credentials for peer ID and, when the daemon runs,
revokes the certificate of peer ID here, so neither side can forward to the other.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_peers_parser", "peers_command"]

_Sub = argparse._SubParsersAction


def add_peers_parser(
    sub: _Sub[argparse.ArgumentParser],
    command: Callable[..., argparse.ArgumentParser],
    state_dir: Callable[[argparse.ArgumentParser], None],
    pair_code: argparse.ArgumentParser,
) -> None:
    pair_code.add_argument(
        "--peer", action="store_true", help="a code for another gateway (`peers pair` there)"
    )
    peers = command(
        sub, "peers", "paired gateways on the LAN: pair, list, revoke", "hearth-gateway peers list"
    )
    verbs = peers.add_subparsers(dest="peers_command", required=True, metavar="VERB")
    pair = command(
        verbs,
        "pair",
        "pair this gateway with another as its peer (its owner ran `hearth-gateway pair --peer`)",
        "hearth-gateway peers pair 7KQ2-M9XD-3FHA --gateway 192.168.1.21:8884 "
        "--ca-fingerprint 3f1c...",
    )
    pair.add_argument("code", help="the peer code the other gateway printed")
    pair.add_argument("--gateway", required=True, metavar="HOST:PORT", help="its pairing listener")
    pair.add_argument(
        "--ca-fingerprint", required=True, metavar="HEX", help="its CA fingerprint, as printed"
    )
    pair.add_argument("--gateway-id", metavar="ID", help="this gateway's id (default: host name)")
    state_dir(pair)
    listing = command(verbs, "list", "peers of this gateway", "hearth-gateway peers list --json")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    state_dir(listing)
    revoke = command(
        verbs, "revoke", "forget a peer, both ways", "hearth-gateway peers revoke attic"
    )
    revoke.add_argument("peer_id", help="the peer's gateway id")
    state_dir(revoke)


def peers_command(args: argparse.Namespace) -> int:
    from hearth_gateway.config import default_state_dir

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    if args.peers_command == "pair":
        return _pair(args, state_dir)
    if args.peers_command == "list":
        return _list(args, state_dir)
    return _revoke(args.peer_id, state_dir)


def _pair(args: argparse.Namespace, state_dir: Path) -> int:
    from hearth.errors import HearthError
    from hearth.pairing import pair
    from hearth_gateway.config import default_gateway_id
    from hearth_gateway.peer_ids import peer_client_id
    from hearth_gateway.peers import peer_credentials_refusal, peers_dir

    own_id = args.gateway_id or default_gateway_id()
    try:
        client_id = peer_client_id(own_id)
        pairing = pair(
            args.code,
            args.gateway,
            ca_fingerprint=args.ca_fingerprint,
            device_id=client_id,
            directory=peers_dir(state_dir),
        )
    except (HearthError, ValueError) as exc:
        print(f"hearth-gateway: peers pair: {exc}", file=sys.stderr)
        return 1
    why = peer_credentials_refusal(pairing, own_id)
    if why is not None:
        shutil.rmtree(pairing.directory, ignore_errors=True)  # nothing of it is kept
        print(f"hearth-gateway: peers pair: not a usable peer: {why}", file=sys.stderr)
        return 1
    print(
        f"paired with {pairing.gateway_id} at {pairing.address} as {client_id}; "
        "a running gateway uses it within seconds"
    )
    return 0


def _list(args: argparse.Namespace, state_dir: Path) -> int:
    from cryptography import x509

    from hearth._identity import pairings
    from hearth_gateway.control import call_admin
    from hearth_gateway.owner import DeviceList, DeviceListRequest
    from hearth_gateway.peer_ids import PEER_PREFIX, is_peer_id
    from hearth_gateway.peers import peers_dir
    from hearth_gateway.pki import is_peer_cert

    rows: list[dict[str, Any]] = []
    for p in pairings(peers_dir(state_dir)):
        cert = x509.load_pem_x509_certificate(Path(p.directory, "device.pem").read_bytes())
        rows.append(
            {
                "peer": p.gateway_id,
                "direction": "to",  # this gateway forwards to it
                "address": str(p.address),
                "as": p.device_id,
                "marked_peer": is_peer_cert(cert),
                "expires": cert.not_valid_after_utc.isoformat(timespec="seconds"),
            }
        )
    sock = state_dir / "control.sock"
    if sock.exists():
        reply = call_admin(sock, DeviceListRequest())
        if isinstance(reply, DeviceList):
            rows += [
                {
                    "peer": d.device_id.removeprefix(PEER_PREFIX),
                    "direction": "from",  # it may forward to this gateway
                    "as": d.device_id,
                    "state": "valid" if d.revoked_at is None else "revoked",
                    "serial": d.serial,
                }
                for d in reply.devices
                if is_peer_id(d.device_id)
            ]
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            arrow = "->" if row["direction"] == "to" else "<-"
            where = row.get("address") or row.get("state", "")
            print(f"{arrow} {row['peer']:<24} {row['as']:<30} {where}")
    return 0


def _revoke(peer_id: str, state_dir: Path) -> int:
    from hearth._identity import pairings
    from hearth.protocol import Error
    from hearth_gateway.control import call_admin
    from hearth_gateway.owner import DeviceRevoke
    from hearth_gateway.peer_ids import PEER_PREFIX
    from hearth_gateway.peers import peers_dir

    done = []
    for p in pairings(peers_dir(state_dir)):
        if p.gateway_id == peer_id:
            shutil.rmtree(p.directory, ignore_errors=True)
            done.append(f"forgot the credentials for {peer_id} (a running gateway stops using it)")
    sock = state_dir / "control.sock"
    if sock.exists():
        reply = call_admin(sock, DeviceRevoke(device_id=PEER_PREFIX + peer_id))
        if not isinstance(reply, Error):
            done.append(f"revoked {PEER_PREFIX}{peer_id} here: it can no longer forward to us")
    if not done:
        print(f"hearth-gateway: peers revoke: no peer {peer_id!r}", file=sys.stderr)
        return 1
    print("; ".join(done))
    return 0
