"""The must-show of migratable runs and data labels (docs/protocol.md §18.6): a private run is
never migrated to a cloud tier; a public one may be. Shown as test_cloud_tier.py shows it for
jobs: a device and its home gateway in a LAN network namespace, a cloud-tier gateway in a WAN
namespace, tcpdump on the veth link between them, and the capture searched for markers.

A snapshot travels zlib-compressed, so a marker inside one would not be found by a search of
the raw bytes even if it crossed. The capture is therefore also unpacked: the MQTT PUBLISH
packets of every reassembled TCP stream are decoded as Hearth messages, uploaded blobs put back
together, and every snapshot among them (or inside a reply) inflated and searched too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hearth.errors import HearthError
from hearth.protocol import (
    BlobChunk,
    RunCheckpoint,
    RunMoved,
    RunResult,
    RunResume,
    RunStart,
    decode_reply,
    decode_request,
)
from hearth.runtime.snapshot import ROUND_MAGIC, SNAPSHOT_MAGIC
from hearth_gateway.status import read_snapshot
from test_cloud_tier import (  # the namespaces, the gateways in them, the capture
    _config,
    _Net,
    _online,
    _start_gateway,
    _tcp_payloads,
    _tcpdump,
    net,  # noqa: F401 - a fixture: pytest finds it here by its name
)
from test_migration import FUEL, _reference, modules  # noqa: F401 - modules: a fixture
from testkit.wait import wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

# hashchain reads 4 KiB at a time; 64 chunks of 4 KiB, each ending with the run's marker, so
# the marker is in every chunk it hashes, on its stack while it does, and in what the snapshot
# carries of stdin. 4800 rounds: ~2 s of work, time enough to move it mid-run.
CHUNKS = 64
ROUNDS = "4800"
CHECKPOINT_EVERY_S = 0.25
LABELS = ("private", "public")

# Runs in the LAN namespace: one device with a Client for the home gateway (the namespace's
# loopback) and one for the cloud tier (across the link). Each run starts on the home gateway,
# is moved to the cloud tier once it has checkpointed (so mid-run), and is waited for. Prints
# what happened as JSON.
_DEVICE = """
import json, sys, time
from hearth.client import Client
from hearth.runtime.limits import WasmLimits

spec = json.loads(sys.argv[1])
module = open(spec["module"], "rb").read()
report = {}
with Client(spec["home"], placement="edge", timeout_s=20) as home, Client(
    spec["cloud"], placement="edge", timeout_s=20
) as cloud:
    cloud.connection()  # connected first: the private run's move is refused on a live link
    for label in ("private", "public"):
        run = home.start_wasm(
            module,
            stdin=open(spec["stdin"][label], "rb").read(),
            args=[spec["rounds"]],
            where="edge",
            data_class=label,
            checkpoint_every_s=spec["checkpoint_every_s"],
            limits=WasmLimits(fuel=spec["fuel"]),
        )
        deadline = time.monotonic() + 60
        while run.where != spec["home_id"] or run.checkpoints < 1:
            if time.monotonic() > deadline or run.done():
                break
            time.sleep(0.01)
        before = {"where": run.where, "checkpoints": run.checkpoints, "done": run.done()}
        moved_to = run.migrate(cloud)
        outcome = run.result(180)
        report[label] = {
            "run_id": run.run_id,
            "before": before,
            "moved_to": moved_to,
            "hops": [[hop.where, hop.reason] for hop in outcome.hops],
            "exit_code": outcome.exit_code,
            "stdout": outcome.stdout.hex(),
        }
print(json.dumps(report))
"""


def _stdin(marker: bytes) -> bytes:
    return b"".join(os.urandom(4096 - len(marker)) + marker for _ in range(CHUNKS))


def _drain(pcap: Path) -> None:
    """Wait until tcpdump has written everything up to now. libpcap hands packets over in
    blocks, a block at the latest after 1 s, and tcpdump stops reading on SIGINT: the run's
    last answer would otherwise be left out of the capture."""
    sizes = [-1]

    def settled() -> bool:
        sizes.append(pcap.stat().st_size)
        return sizes[-1] == sizes[-2]

    assert wait_until(settled, 30, step_s=1.5)


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """An MQTT variable byte integer at ``at``: (value, where the next field starts)."""
    value = 0
    for i in range(4):
        byte = data[at + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, at + i + 1
    raise ValueError("malformed MQTT length")


def _publishes(stream: bytes) -> Iterator[bytes]:
    """The payloads of the MQTT 5 PUBLISH packets in one direction of a connection, read from
    its start; a packet the capture ended inside is left out."""
    at = 0
    while at < len(stream):
        try:
            length, body = _varint(stream, at + 1)
        except IndexError:
            return
        if body + length > len(stream):
            return
        first, packet = stream[at], stream[body : body + length]
        at = body + length
        if first >> 4 != 3:  # not PUBLISH
            continue
        start = 2 + int.from_bytes(packet[:2], "big")  # the topic
        if (first >> 1) & 3:  # QoS 1 or 2: a packet identifier
            start += 2
        properties, start = _varint(packet, start)
        yield packet[start + properties :]


@dataclass
class _Unpacked:
    """What the Hearth messages in a capture carry."""

    messages: list[msgspec.Struct] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> the bytes put together
    inflated: list[bytes] = field(default_factory=list)  # the body of every snapshot

    def run_ids(self) -> set[str]:
        kinds = (RunStart, RunResume, RunCheckpoint, RunMoved, RunResult)
        return {m.run_id for m in self.messages if isinstance(m, kinds)}

    def found(self, marker: bytes) -> int:
        """In how many blobs and inflated snapshots ``marker`` occurs."""
        return sum(marker in data for data in [*self.blobs.values(), *self.inflated])


def _unpack(streams: dict[Any, bytes]) -> _Unpacked:
    unpacked = _Unpacked()
    chunks: dict[str, dict[int, bytes]] = {}
    snapshots: list[bytes] = []
    for stream in streams.values():
        for payload in _publishes(stream):
            message: msgspec.Struct
            try:
                message = decode_request(payload)
            except HearthError:
                try:
                    message = decode_reply(payload)
                except HearthError:
                    continue  # a gateway status, a ping answer of another shape
            unpacked.messages.append(message)
            if isinstance(message, BlobChunk):
                chunks.setdefault(message.sha256, {})[message.offset] = message.data
            elif isinstance(message, RunMoved | RunCheckpoint):
                snapshots.append(message.snapshot)
    for sha, parts in chunks.items():
        unpacked.blobs[sha] = b"".join(parts[offset] for offset in sorted(parts))
    for data in [*unpacked.blobs.values(), *snapshots]:
        if data[:8] in (SNAPSHOT_MAGIC, ROUND_MAGIC):
            unpacked.inflated.append(zlib.decompress(data[10:]))
    return unpacked


def test_a_private_run_is_never_migrated_to_a_cloud_tier_and_a_public_one_is(
    net: _Net,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    examples: Path,
    modules: tuple[bytes, bytes],  # noqa: F811 - the fixture imported above
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both runs start on the home gateway and are asked, mid-run, to move to the cloud tier
    (``run.migrate(cloud_client)``): the private one's move is refused and it finishes on the
    LAN with the output of a run that never moved; the public one moves and finishes there. The
    link carries plaintext MQTT on purpose: over TLS the search would prove nothing."""
    plain, _ = modules
    markers = {label: os.urandom(16) for label in LABELS}
    stdin = {label: _stdin(markers[label]) for label in LABELS}
    expected = {label: _reference(plain, stdin[label], [ROUNDS]) for label in LABELS}
    for label in LABELS:
        (tmp_path / f"{label}.stdin").write_bytes(stdin[label])
    policy = tmp_path / "long-runs.toml"
    policy.write_text(f"[wasm]\nfuel = {FUEL}\n")
    common = ["--workers", "1", "--policy", str(policy)]
    common += ["--config", _config(tmp_path / "runners.toml", runners=["wasm", "migrate"])]

    cloud_id, cloud_state = _start_gateway(
        net, net.wan, tmp_path, "--tier", "cloud", *common, "--listen", f"{net.wan_ip}:1883"
    )
    cloud_proc = net.procs[-1]
    wan_pcap, lo_pcap = tmp_path / "lan-to-wan.pcap", tmp_path / "lan-loopback.pcap"
    captures = [_tcpdump(net, net.lan_if, wan_pcap), _tcpdump(net, "lo", lo_pcap)]
    assert wait_until(lambda: _online(cloud_state, cloud_proc, tmp_path / f"{cloud_id}.log"), 45)
    # The home gateway has the cloud tier as its upstream too: a second way a run could go
    # there, if a gateway ever forwarded one (it must not, §18.6).
    home_id, home_state = _start_gateway(
        net,
        net.lan,
        tmp_path,
        *common,
        "--listen",
        "127.0.0.1:1883",
        "--upstream",
        f"mqtt://{net.wan_ip}:1883",
    )
    home_proc = net.procs[-1]
    home_log = tmp_path / f"{home_id}.log"
    assert wait_until(lambda: _online(home_state, home_proc, home_log), 45)
    assert wait_until(lambda: read_snapshot(home_state).upstream_connected, 30), (  # type: ignore[union-attr]
        home_log.read_text()
    )

    spec = {
        "home": "127.0.0.1:1883",
        "home_id": home_id,
        "cloud": f"{net.wan_ip}:1883",
        "module": str(examples / "wasm" / "hashchain.migratable.wasm"),
        "stdin": {label: str(tmp_path / f"{label}.stdin") for label in LABELS},
        "rounds": ROUNDS,
        "fuel": FUEL,
        "checkpoint_every_s": CHECKPOINT_EVERY_S,
    }
    device = subprocess.run(
        ["ip", "netns", "exec", net.lan, sys.executable, "-c", _DEVICE, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    for proc in (home_proc, cloud_proc):
        proc.send_signal(signal.SIGTERM)
    assert device.returncode == 0, device.stderr + home_log.read_text()
    assert (home_proc.wait(timeout=60), cloud_proc.wait(timeout=60)) == (0, 0)
    for pcap, proc in zip((wan_pcap, lo_pcap), captures, strict=True):
        _drain(pcap)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    report = json.loads(device.stdout)
    private, public = report["private"], report["public"]

    # Both were moved mid-run from the home gateway, and both ended as a run that never moved.
    for label in LABELS:
        before = report[label]["before"]
        assert (before["where"], before["done"]) == (home_id, False), label
        assert before["checkpoints"] >= 1, label
        assert report[label]["hops"][0][0] == home_id, label
        got = (report[label]["exit_code"], bytes.fromhex(report[label]["stdout"]))
        assert got == expected[label], label
    # The private run's move was refused (by the device, before anything of it was sent): it
    # went on on the LAN, never on the cloud tier.
    assert cloud_id not in [where for where, _ in private["hops"]]
    assert private["moved_to"] != cloud_id
    assert any(
        "cloud tier" in reason and where in (home_id, "local") for where, reason in private["hops"]
    ), private["hops"]
    # The public run went, and finished there.
    assert public["moved_to"] == cloud_id
    assert [where for where, _ in public["hops"]] == [home_id, cloud_id]

    raw = wan_pcap.read_bytes()
    packets, streams = _tcp_payloads(raw)
    wire = list(streams.values())
    assert streams
    # Only MQTT to the cloud tier's broker crossed: the device's connection and the upstream.
    assert {(k[0], k[2], 1883 in (k[1], k[3])) for k in streams} <= {
        (net.lan_ip, net.wan_ip, True),
        (net.wan_ip, net.lan_ip, True),
    }
    unpacked = _unpack(streams)
    # What each run is recognised by: its stdin marker, its own output (the final line: its
    # digests, which only its data produce) and its run id.
    searched = {
        label: {
            "stdin marker": markers[label],
            "output": expected[label][1].splitlines()[-1],
            "run id": report[label]["run_id"].encode(),
        }
        for label in LABELS
    }
    found = {
        label: {
            name: (raw.count(m), sum(s.count(m) for s in wire), unpacked.found(m))
            for name, m in searched[label].items()
        }
        for label in LABELS
    }
    leaked = {name: hits for name, hits in found["private"].items() if any(hits)}
    assert leaked == {}, f"the private run on the link (raw, streams, unpacked): {leaked}"
    assert unpacked.run_ids() == {public["run_id"]}
    assert {m.data_class for m in unpacked.messages if isinstance(m, BlobChunk)} == {"public"}
    # The control: the public run did cross, and each search finds what it should. Its output
    # came back in the clear (run_result) and its id named the resumed hop; its stdin marker
    # is inside the snapshot the device uploaded, found once the snapshot is inflated.
    public_found = found["public"]
    assert all(public_found["output"][:2]), public_found
    assert all(public_found["run id"][:2]), public_found
    assert public_found["stdin marker"][2] >= 1, public_found
    assert unpacked.inflated, "no snapshot crossed the link"
    results = [m for m in unpacked.messages if isinstance(m, RunResult)]
    assert [(m.run_id, m.hops[-1]) for m in results] == [(public["run_id"], cloud_id)]
    # And the private run's bytes are in the clear on the LAN namespace's loopback (its stdin
    # in run_start, between the device and the home gateway): the raw search would see them.
    loopback = lo_pcap.read_bytes()
    assert markers["private"] in loopback
    assert searched["private"]["run id"] in loopback

    with capsys.disabled():
        print(
            f"\ncapture on {net.lan_if}: {len(raw)} bytes, {packets} packets, "
            f"{sum(map(len, wire))} TCP payload bytes in {len(wire)} directions, "
            f"{len(unpacked.messages)} Hearth messages, {len(unpacked.blobs)} blobs, "
            f"{len(unpacked.inflated)} snapshots inflated; hits (raw, streams, unpacked): "
            f"private {found['private']}, public {found['public']}; "
            f"LAN loopback: {len(loopback)} bytes, private stdin marker "
            f"{loopback.count(markers['private'])}x; private hops {private['hops']}"
        )
