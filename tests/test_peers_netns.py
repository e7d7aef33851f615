"""The must-show of peer forwarding (issue 12, docs/peers.md), in network namespaces.

A LAN namespace holds gateway A (one worker, saturated by a long private job), its device, the
paired peer B (10.x.y.3) and gateway C (10.x.y.4), which A is not paired with as a peer: A holds
only a *device* certificate of C, stored where peer credentials go, and must refuse to use it.
A WAN namespace holds a cloud-tier gateway, A's upstream, behind the one veth link, on which
tcpdump runs. Private jobs sent to A while it is saturated run on B; none reaches C or the
cloud tier; each answer names where it ran and why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from hearth_gateway.status import read_snapshot
from test_cloud_tier import (  # the namespaces, the gateways in them, the capture
    _audit,
    _config,
    _ip,
    _Net,
    _online,
    _tcp_payloads,
    _tcpdump,
    net,  # noqa: F401 - a fixture: pytest finds it here by its name
)
from testkit.wait import wait_until

_POLICY = """
[wasm]
fuel = 10_000_000_000_000
wall_timeout_s = {spin_s}
[placement]
upstream_when_queue_over = 0
"""

# Runs in the LAN namespace: a device on gateway A's broker (the namespace's loopback). One
# private job keeps A's only worker busy; then echo jobs whose stdin is a marker, the module a
# private blob. Prints every answer as JSON.
_DEVICE = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from helpers import RawDevice
from hearth.protocol import BlobStored, WasmJob, WasmResult
from hearth.transport import BrokerAddress

spec = json.loads(sys.argv[2])
modules = {name: open(path, "rb").read() for name, path in spec["modules"].items()}
sha = {name: hashlib.sha256(data).hexdigest() for name, data in modules.items()}
with RawDevice(BrokerAddress.parse(spec["broker"]), spec["gateway"]) as dev:
    for data in modules.values():
        assert isinstance(dev.upload(data), BlobStored)  # private blobs
    sent = {"spin": dev.send(WasmJob(job_id="spin", module=sha["spin"]))}
    for job_id, (label, marker) in spec["jobs"].items():
        job = WasmJob(job_id=job_id, module=sha["echo"], stdin=bytes.fromhex(marker),
                      data_class=label)
        sent[job_id] = dev.send(job)
    answers = {}
    for job_id, correlation in sent.items():
        reply = dev.reply(correlation, timeout_s=60)
        if isinstance(reply, WasmResult):
            answers[job_id] = {"stdout": reply.stdout.hex(), "ran_on": reply.timing.upstream,
                               "reason": reply.timing.reason or ""}
        else:
            answers[job_id] = {"error": str(getattr(reply, "code", type(reply).__name__))}
print(json.dumps(answers))
"""

# Runs in the LAN namespace: pairs as a device (the SDK's pairing) into a given directory.
_PAIR_AS_DEVICE = """
import sys
from pathlib import Path
from hearth.pairing import pair
code, address, fingerprint, device_id, directory = sys.argv[1:]
pair(code, address, ca_fingerprint=fingerprint, device_id=device_id, directory=Path(directory))
"""


def _gateway(lan: _Net, ns: str, tmp_path: Path, gateway_id: str, *args: str) -> Path:
    state = tmp_path / gateway_id / "state"
    state.mkdir(parents=True, exist_ok=True)
    lan.run(
        ns,
        sys.executable,
        "-m",
        "hearth_gateway.cli",
        "run",
        "--gateway-id",
        gateway_id,
        "--state-dir",
        str(state),
        "--no-mdns",
        *args,
        log=tmp_path / f"{gateway_id}.log",
    )
    return state


def _cli(*args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "hearth_gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _code(state: Path, *extra: str) -> dict[str, Any]:
    result = _cli("pair", "--json", *extra, "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.mark.root
def test_a_saturated_gateway_sends_private_work_to_its_paired_peer_only(
    net: _Net,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    wasm: dict[str, Path],
) -> None:
    subnet = net.lan_ip.rsplit(".", 1)[0]
    b_ip, c_ip = f"{subnet}.3", f"{subnet}.4"
    for address in (b_ip, c_ip):  # each LAN gateway its own address
        result = _ip("-n", net.lan, "addr", "add", f"{address}/24", "dev", net.lan_if)
        assert result.returncode == 0, result.stderr
    runners = _config(tmp_path / "runners.toml", runners=["wasm"])
    policy = tmp_path / "a-policy.toml"
    policy.write_text(_POLICY.format(spin_s=5.0))
    suffix = uuid.uuid4().hex[:6]
    ids = {name: f"{name}-{suffix}" for name in ("a", "b", "c", "cloud")}
    logs = {name: tmp_path / f"{gid}.log" for name, gid in ids.items()}

    cloud = _gateway(net, net.wan, tmp_path, ids["cloud"], "--tier", "cloud", "--workers", "1",
                     "--config", runners, "--listen", f"{net.wan_ip}:1883")  # fmt: skip
    cloud_proc = net.procs[-1]
    b = _gateway(net, net.lan, tmp_path, ids["b"], "--workers", "4", "--config", runners,
                 "--listen", "127.0.0.1:1884", "--lan-listen", f"{b_ip}:8883",
                 "--pairing-listen", f"{b_ip}:8884")  # fmt: skip
    b_proc = net.procs[-1]
    c = _gateway(net, net.lan, tmp_path, ids["c"], "--workers", "2", "--config", runners,
                 "--listen", "127.0.0.1:1885", "--lan-listen", f"{c_ip}:8883",
                 "--pairing-listen", f"{c_ip}:8884")  # fmt: skip
    c_proc = net.procs[-1]
    for name, state, proc in (("cloud", cloud, cloud_proc), ("b", b, b_proc), ("c", c, c_proc)):
        assert wait_until(lambda s=state, p=proc, n=name: _online(s, p, logs[n]), 60)

    # A pairs with B as its peer (a peer code), and with C only as a device (a device code),
    # leaving those device credentials where peer credentials go.
    a = tmp_path / ids["a"] / "state"
    a.mkdir(parents=True)
    code = _code(b, "--peer")
    paired = _cli("peers", "pair", code["code"], "--gateway", f"{b_ip}:8884", "--ca-fingerprint",
                  code["ca_fingerprint"], "--gateway-id", ids["a"], "--state-dir", str(a),
                  ns=net.lan)  # fmt: skip
    assert paired.returncode == 0, paired.stderr
    code = _code(c)
    as_device = subprocess.run(
        ["ip", "netns", "exec", net.lan, sys.executable, "-c", _PAIR_AS_DEVICE, code["code"],
         f"{c_ip}:8884", code["ca_fingerprint"], f"{ids['a']}-as-device", str(a / "peers")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert as_device.returncode == 0, as_device.stderr
    listed = _cli("peers", "list", "--json", "--state-dir", str(a))
    rows = {r["peer"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert (rows[ids["b"]]["marked_peer"], rows[ids["c"]]["marked_peer"]) == (True, False)

    wan_pcap = tmp_path / "lan-to-wan.pcap"
    capture = _tcpdump(net, net.lan_if, wan_pcap)
    _gateway(net, net.lan, tmp_path, ids["a"], "--workers", "1", "--config", runners,
             "--policy", str(policy), "--listen", "127.0.0.1:1883",
             "--upstream", f"mqtt://{net.wan_ip}:1883")  # fmt: skip
    a_proc = net.procs[-1]
    assert wait_until(lambda: _online(a, a_proc, logs["a"]), 60)

    def connected() -> bool:
        rows = _audit(a)
        return all(
            any(r["action"] == "egress:connect" and r["decision"] == "allowed" and t in r["target"]
                for r in rows)
            for t in (b_ip, net.wan_ip)
        )  # fmt: skip

    assert wait_until(connected, 30), logs["a"].read_text()

    private = {f"private-{i}": os.urandom(16) for i in range(4)}
    public = {f"public-{i}": os.urandom(16) for i in range(2)}
    spec = {
        "broker": "127.0.0.1:1883",
        "gateway": ids["a"],
        "modules": {"spin": str(wasm["spin"]), "echo": str(wasm["echo"])},
        "jobs": {
            job_id: [("private" if job_id in private else "public"), marker.hex()]
            for job_id, marker in (private | public).items()
        },
    }
    device = subprocess.run(
        ["ip", "netns", "exec", net.lan, sys.executable, "-c", _DEVICE,
         str(Path(__file__).parent), json.dumps(spec)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert device.returncode == 0, device.stderr + logs["a"].read_text()
    answers = json.loads(device.stdout)
    capture.send_signal(signal.SIGINT)
    assert capture.wait(timeout=10) == 0
    c_completed = read_snapshot(c).jobs_completed  # type: ignore[union-attr]
    for proc in (a_proc, b_proc, c_proc, cloud_proc):
        proc.send_signal(signal.SIGTERM)
    assert [p.wait(timeout=60) for p in (a_proc, b_proc, c_proc, cloud_proc)] == [0, 0, 0, 0]

    # Each answer names where it ran: B (with A's reason) or A itself (""), never C or the cloud.
    assert answers["spin"] == {"error": "timeout"}
    on_b = []
    for job_id, marker in (private | public).items():
        answer = answers[job_id]
        assert answer["stdout"] == marker.hex(), (job_id, answer)
        assert answer["ran_on"] in ("", ids["b"]), (job_id, answer)
        if answer["ran_on"]:
            assert "saturated (1/1 workers busy" in answer["reason"], answer
            assert f"to paired LAN peer {ids['b']}" in answer["reason"], answer
            on_b.append(job_id)
        else:
            assert answer["reason"] == ""
    # Only the first job after the spin waits on A: the gateway is saturated from the second.
    assert [j for j in private if j not in on_b] == ["private-0"], answers
    assert set(public) <= set(on_b)

    # The audit of each side says the same, and names the refused device certificate.
    a_rows = _audit(a)
    placed = {
        r["reason"].split(":")[0].removeprefix("job "): r
        for r in a_rows
        if r["action"].startswith("place:")
    }
    for job_id in on_b:
        assert placed[job_id]["target"] == f"peer {ids['b']}", placed[job_id]
    refused = [r for r in a_rows if r["action"] == "peer:connect"]
    assert [(r["target"], r["decision"]) for r in refused] == [(ids["c"], "refused")]
    assert "device certificate" in refused[0]["reason"]
    b_rows = [r for r in _audit(b) if r["action"].startswith("place:")]
    assert {r["actor"] for r in b_rows} == {f"peer.{ids['a']}"}
    assert len(b_rows) == len(on_b)
    # C: nothing placed, nothing run. The cloud tier: nothing from A.
    assert not [r for r in _audit(c) if r["action"].startswith("place:")]
    assert c_completed == 0
    assert not [r for r in _audit(cloud) if r["action"].startswith("place:")]
    # And no private byte on the link to the WAN (the upstream connection is plaintext).
    raw = wan_pcap.read_bytes()
    _, streams = _tcp_payloads(raw)
    leaked = [j for j, m in private.items() if m in raw or any(m in s for s in streams.values())]
    assert leaked == []
