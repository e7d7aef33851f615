"""Many gateways on one LAN (issue 12, items 1 and 2), as a person would meet them: boxes that
share a host name on one mDNS segment (bound to 127.0.0.1), and a device paired with two
gateways that remembers them between commands. Real gateways, real managed Mosquittos, the
real `hearth` command line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hearth._identity import Pairing
from hearth._known import known_gateways, load_known
from hearth.pairing import pair
from hearth.placement import Estimates, Placement, decide
from hearth.transport import BrokerAddress
from testkit.gateway import GatewayProcess
from testkit.net import free_port
from testkit.wait import wait_until


@dataclass
class SecureGateway:
    """A gateway with its device (TLS) and pairing listeners, on a managed Mosquitto."""

    gw: GatewayProcess
    lan: BrokerAddress
    pairing: BrokerAddress

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hearth_gateway.cli", *args, "--state-dir",
             str(self.gw.state_dir)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def code(self) -> dict[str, Any]:
        result = self.admin("pair", "--json")
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))


@pytest.fixture
def secure(make_gateway: Callable[..., GatewayProcess]) -> Callable[..., SecureGateway]:
    def make(*, mdns: bool = False) -> SecureGateway:
        lan = BrokerAddress("127.0.0.1", free_port())
        pairing = BrokerAddress("127.0.0.1", free_port())
        gw = make_gateway(
            "--lan-listen", str(lan), "--pairing-listen", str(pairing),
            *(["--mdns-interface", "127.0.0.1"] if mdns else []),
            managed=True,
        )  # fmt: skip
        return SecureGateway(gw, lan, pairing)

    return make


def _pair(sg: SecureGateway, device: Path, device_id: str = "cam-1") -> None:
    issued = sg.code()
    pair(issued["code"], str(sg.pairing), ca_fingerprint=issued["ca_fingerprint"],
         device_id=device_id, directory=device, timeout_s=10)  # fmt: skip


def _hearth(
    *args: str, env: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if k not in ("HEARTH_GATEWAY", "HEARTH_CLIENT_ID")}
    return subprocess.run(
        [sys.executable, "-m", "hearth.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env={**clean, **env},
        check=False,
    )


@pytest.mark.parametrize("count", [2, 3])
def test_namesakes_on_one_mdns_segment_all_stay_up_discoverable_and_usable_by_id(
    make_gateway: Callable[..., GatewayProcess], wasm: dict[str, Path], tmp_path: Path, count: int
) -> None:
    # What `count` raspberrypis set up alike would advertise: one instance name.
    name = f"raspberrypi-{uuid.uuid4().hex[:6]}"
    gateways = [
        make_gateway("--mdns-interface", "127.0.0.1", "--mdns-name", name, managed=True)
        for _ in range(count)
    ]
    up_since = time.monotonic()
    owned = {gw.gateway_id: gw.snapshot().mdns_name for gw in gateways}
    assert sorted(owned.values()) == sorted([name] + [f"{name} ({n})" for n in range(2, count + 1)])
    renamed = [gw for gw in gateways if "is taken on this LAN" in gw.log()]
    assert len(renamed) == count - 1

    env = {"HEARTH_CONFIG_DIR": str(tmp_path / "device")}

    def all_discovered() -> None:
        found = _hearth("discover", "--json", "--interface", "127.0.0.1", "--timeout", "3", env=env)
        assert found.returncode == 0, found.stderr
        listed = {g["gateway_id"]: g for g in json.loads(found.stdout)}
        for gw in gateways:
            assert listed[gw.gateway_id]["broker"] == gw.address
            assert listed[gw.gateway_id]["instance"] == owned[gw.gateway_id]

    all_discovered()

    for gw in gateways:  # a job on each, named by its id
        ran = _hearth(
            "run", "--gateway", gw.gateway_id, "--interface", "127.0.0.1", "--where", "edge",
            "--explain", str(wasm["echo"]), stdin=b"to " + gw.gateway_id.encode(), env=env,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout == b"to " + gw.gateway_id.encode()
        assert f"ran on edge ({gw.gateway_id})".encode() in ran.stderr

    # A minute on, none of them crashed on the conflict (no crash loop under systemd's
    # Restart=on-failure), each still online, discoverable under the name it owns.
    time.sleep(max(0.0, 60.0 - (time.monotonic() - up_since)))
    for gw in gateways:
        assert gw.proc is not None
        assert gw.proc.poll() is None
        assert gw.snapshot().state == "online"
        assert "Traceback" not in gw.log()
    all_discovered()


def test_status_shows_every_listener_and_the_paired_devices(
    secure: Callable[..., SecureGateway], tmp_path: Path
) -> None:
    sg = secure()
    _pair(sg, tmp_path / "device")
    status = sg.admin("status")
    assert status.returncode == 0, status.stderr
    assert f"listener    loopback: {sg.gw.listen}" in status.stdout
    assert f"listener    lan-tls: {sg.lan}" in status.stdout
    assert f"listener    pairing: {sg.pairing}" in status.stdout
    # Written every few seconds: the pairing shows up by the next snapshot.
    assert wait_until(lambda: sg.gw.snapshot().paired_devices == 1, 20.0)
    ready = [line for line in sg.gw.log().splitlines() if " ready: " in line][-1]
    assert f"lan-tls {sg.lan}" in ready
    assert f"pairing {sg.pairing}" in ready
    assert "paired devices" in ready


@pytest.fixture
def two_paired(
    secure: Callable[..., SecureGateway], tmp_path: Path
) -> tuple[list[SecureGateway], dict[str, str]]:
    """Two TLS gateways and one device paired with both (its own configuration directory)."""
    device = tmp_path / "device"
    gateways = [secure(), secure()]
    for sg in gateways:
        _pair(sg, device)
    return gateways, {"HEARTH_CONFIG_DIR": str(device)}


def test_tasks_list_asks_every_paired_gateway_and_names_it(
    two_paired: tuple[list[SecureGateway], dict[str, str]], examples: Path
) -> None:
    gateways, env = two_paired
    module = examples / "tasks" / "indexer.wasm"
    ids = {}
    for sg in gateways:  # one task on each, each gateway named by its id
        installed = _hearth(
            "tasks", "install", "--gateway", sg.gw.gateway_id, str(module), "--name",
            f"on-{sg.gw.gateway_id}", "--every", "60", env=env,
        )  # fmt: skip
        assert installed.returncode == 0, installed.stderr
        assert f"gateway     {sg.gw.gateway_id}".encode() in installed.stdout
        ids[sg.gw.gateway_id] = installed.stdout.split()[1].decode()

    listing = _hearth("tasks", "list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    tasks = {t["task_id"]: t["gateway_id"] for t in json.loads(listing.stdout)}
    assert tasks == {task: gw for gw, task in ids.items()}
    table = _hearth("tasks", "list", env=env).stdout.decode()
    for gw, task in ids.items():
        row = next(line for line in table.splitlines() if task in line)
        assert row.startswith(gw)


def test_auto_placement_is_remembered_between_cli_calls(
    two_paired: tuple[list[SecureGateway], dict[str, str]], wasm: dict[str, Path]
) -> None:
    gateways, env = two_paired
    reasons = []
    for n in range(20):
        ran = _hearth("run", "--where", "auto", "--explain", str(wasm["echo"]), stdin=b"%d" % n,
                      env=env)  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout == b"%d" % n
        lines = ran.stderr.decode().splitlines()
        reasons.append(next(line for line in lines if line.startswith("hearth: ran on")))
        # Every call found its gateway at the address stored by the calls before it.
        assert any("its stored address, no discovery" in line for line in lines), lines
    assert "stored from" not in reasons[0]  # nothing measured yet
    for n, reason in enumerate(reasons[1:], start=1):
        assert f"stored from {n} earlier calls" in reason, reasons
    # Once both sides are measured (a warm-up and a measurement each), each call is a
    # comparison of stored measurements, and says so.
    decided = [r for r in reasons if "(measured; stored from" in r or "re-measuring" in r]
    assert len(decided) >= 15, reasons
    # One of the two paired gateways answered every call: the quicker last time, not one per
    # call by chance.
    used = {r.split("(", 1)[1].split(")", 1)[0] for r in reasons if "ran on edge" in r}
    assert len(used) <= 1, reasons
    stored = {k.gateway_id: k for k in known_gateways(Path(env["HEARTH_CONFIG_DIR"]))}
    assert set(stored) == {sg.gw.gateway_id for sg in gateways}
    measured = [k for k in stored.values() if k.estimates]
    assert len(measured) == 1
    assert next(iter(measured[0].estimates.values())).calls == 20


def test_gateway_by_id_and_pairing_by_id_use_the_fingerprint_from_mdns(
    secure: Callable[..., SecureGateway], tmp_path: Path, wasm: dict[str, Path]
) -> None:
    sg = secure(mdns=True)
    env = {"HEARTH_CONFIG_DIR": str(tmp_path / "device"), "HEARTH_INTERFACE": "127.0.0.1"}
    code = sg.code()
    paired = _hearth("pair", code["code"], "--gateway", sg.gw.gateway_id, "--id", "cam-9",
                     env=env)  # fmt: skip
    assert paired.returncode == 0, paired.stderr
    assert f"CA fingerprint (from mDNS, checked): {code['ca_fingerprint']}".encode() in (
        paired.stdout
    )
    ran = _hearth("run", "--gateway", sg.gw.gateway_id, "--where", "edge", "--explain",
                  str(wasm["echo"]), stdin=b"x", env=env)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert f"ran on edge ({sg.gw.gateway_id})".encode() in ran.stderr
    assert b"its stored address, no discovery" in ran.stderr


def test_two_gateways_with_one_id_are_both_discovered_by_their_ca(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    # Two boxes left with the default id (their shared host name): same id, same mDNS name.
    same = f"raspberrypi-{uuid.uuid4().hex[:6]}"
    gateways = []
    for _ in range(2):
        lan = BrokerAddress("127.0.0.1", free_port())
        gateways.append(
            make_gateway(
                "--lan-listen",
                str(lan),
                "--pairing-listen",
                f"127.0.0.1:{free_port()}",
                "--mdns-interface",
                "127.0.0.1",
                "--mdns-name",
                same,
                "--gateway-id",
                same,
                managed=True,
            )
        )
    env = {"HEARTH_CONFIG_DIR": str(tmp_path / "device")}
    found = _hearth("discover", "--json", "--interface", "127.0.0.1", "--timeout", "3", env=env)
    namesakes = [g for g in json.loads(found.stdout) if g["gateway_id"] == same]
    assert len(namesakes) == 2
    assert len({g["ca_fingerprint"] for g in namesakes}) == 2
    assert {g["instance"] for g in namesakes} == {same, f"{same} (2)"}
    # Named by that id, the device refuses to guess, and says how to choose.
    ran = _hearth("run", "--gateway", same, "--interface", "127.0.0.1", "--where", "edge",
                  "/dev/null", env=env)  # fmt: skip
    assert ran.returncode == 3
    assert b"2 gateways on the LAN call themselves" in ran.stderr


_ADVERTISED = """
import json, sys
from pathlib import Path
from hearth.transport import BrokerAddress
from hearth_gateway.discovery import advertised_addresses
from hearth_gateway.pki import LocalCA, certificate_ips
lan = BrokerAddress("0.0.0.0", 8883)
ca = LocalCA(Path(sys.argv[1]), "gw-two-nics")
hosts = ["localhost", "127.0.0.1", "::1", *advertised_addresses(lan, None)]  # as pairing_for
ca.ensure_server_cert(hosts)
named = certificate_ips(ca.server_cert_path)
print(json.dumps({"named": sorted(named), "advertised": advertised_addresses(lan, None, named),
                  "stale": advertised_addresses(lan, None, {"10.77.0.9"})}))
"""


@pytest.mark.root
def test_a_box_with_several_interfaces_advertises_only_what_its_certificate_names(
    tmp_path: Path,
) -> None:
    """In a network namespace of its own: a LAN interface and a docker bridge (each one end of
    a veth pair: this kernel has no dummy interfaces)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    ns = f"hearth-nics-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for dev, address in (("lan0", "10.77.0.2/24"), ("docker0", "172.31.0.1/16")):
            for cmd in (
                ["ip", "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p"],
                ["ip", "addr", "add", address, "dev", dev],
                ["ip", "link", "set", dev, "up"],
            ):
                subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _ADVERTISED, str(tmp_path / "pki")],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    seen = json.loads(out.stdout)
    assert "10.77.0.2" in seen["named"]
    assert "172.31.0.1" not in seen["named"]  # the docker bridge
    assert seen["advertised"] == ["10.77.0.2"]
    # A certificate that names none of the box's addresses any more: nothing of the LAN is
    # advertised (only loopback), rather than an address the device's TLS check would refuse.
    assert seen["stale"] == ["127.0.0.1"]


def _pairing(root: Path, gateway_id: str, fingerprint: str) -> Pairing:
    directory = root / "gateways" / gateway_id
    directory.mkdir(parents=True)
    p = Pairing(gateway_id, "cam-1", "127.0.0.1", 8883, fingerprint, str(directory), 8884)
    (directory / "pairing.json").write_text(json.dumps(dataclasses.asdict(p)))
    return p


def test_the_known_gateways_store_keeps_address_rtt_and_measurements(tmp_path: Path) -> None:
    slow = load_known(_pairing(tmp_path, "attic", "aa" * 32))
    slow.answered(BrokerAddress("192.168.1.20", 8883), 4.0)
    slow.estimates["wasm:abc"] = Estimates(local_ms=9.0, edge_ms=3.0, calls=7, warmed={"edge"})
    slow.save()
    fast = load_known(_pairing(tmp_path, "cellar", "bb" * 32))
    fast.answered(BrokerAddress("192.168.1.21", 8883), 1.0)
    fast.save()
    found = known_gateways(tmp_path)
    assert [k.gateway_id for k in found] == ["cellar", "attic"]  # the quicker last time first
    attic = found[1]
    assert attic.address == BrokerAddress("192.168.1.20", 8883)
    loaded = attic.estimates["wasm:abc"]
    assert (loaded.local_ms, loaded.edge_ms, loaded.calls, loaded.warmed) == (9.0, 3.0, 7, {"edge"})
    assert loaded.stored_calls == 7
    reason = decide(Placement.AUTO, gateway=True, local=True, estimates=loaded).reason
    assert reason == "edge 3.0 ms <= local 9.0 ms (measured; stored from 7 earlier calls)"


def test_measurements_of_another_identity_or_a_torn_file_are_a_fresh_start(
    tmp_path: Path,
) -> None:
    pairing = _pairing(tmp_path, "attic", "aa" * 32)
    known = load_known(pairing)
    known.estimates["k"] = Estimates(local_ms=1.0, edge_ms=2.0, calls=3)
    known.save()
    # The gateway was paired again with another CA: what was measured is not carried over.
    other = dataclasses.replace(pairing, ca_fingerprint="cc" * 32)
    assert load_known(other).estimates == {}
    known.path.write_text('{"ca_fingerprint": "' + "aa" * 32 + '", "estimates": {"k": [')
    fresh = load_known(pairing)
    assert fresh.estimates == {}
    assert fresh.address == pairing.address  # back to where pairing found it
