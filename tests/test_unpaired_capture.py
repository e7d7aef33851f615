"""The must-show of issue 11 item 5: an unpaired device never speaks MQTT in plaintext to a
gateway's TLS listener. tcpdump records every byte sent to the device listener's port on
loopback while an unpaired device discovers the gateway (with its round-trip probe), runs
``hearth run`` (auto, and ``--gateway`` with edge) and makes a ``Client`` call; the capture
holds TLS ClientHellos at most, never an MQTT CONNECT, never the device's id. A control
connection that does send plaintext MQTT there shows that the capture would see it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import hearth
from hearth.discovery import discover
from hearth.errors import NotPaired
from hearth.transport import make_client
from test_cloud_tier import _tcp_payloads
from test_pairing import SecureGateway, secure  # noqa: F401 - `secure` is a fixture
from testkit.wait import wait_until

pytestmark = [pytest.mark.root]

_TLS_RECORD = (0x16, 0x03)  # a TLS handshake record, any 3.x version
_MQTT_CONNECT = 0x10


def _tcpdump(port: int, pcap: Path) -> subprocess.Popen[bytes]:
    log = pcap.with_suffix(".log")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            # -Z root: it would otherwise drop to a user that cannot write into tmp_path.
            [
                *("tcpdump", "-i", "lo", "-w", str(pcap), "-U", "-n", "-s", "0", "-Z", "root"),
                *("tcp", "port", str(port)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    assert wait_until(lambda: b"listening on" in log.read_bytes(), 10), log.read_text()
    return proc


def _stop(proc: subprocess.Popen[bytes], pcap: Path) -> bytes:
    sizes = [-1]

    def settled() -> bool:  # libpcap hands packets over in blocks: wait for the last one
        sizes.append(pcap.stat().st_size)
        return sizes[-1] == sizes[-2]

    assert wait_until(settled, 30, step_s=1.5)
    proc.send_signal(2)
    proc.wait(timeout=10)
    return pcap.read_bytes()


def _hearth(
    *args: str, env: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "hearth.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
        env=env,
    )


def _plaintext_connect(port: int, client_id: str) -> None:
    """The control: what the SDK did before, an MQTT CONNECT in the clear to the TLS port."""
    client = make_client(client_id)
    try:
        client.connect("127.0.0.1", port)
        client.loop(timeout=0.5)  # sends CONNECT; the TLS listener drops it
    except OSError:
        pass
    finally:
        client.disconnect()


def test_an_unpaired_device_sends_no_mqtt_plaintext_to_the_tls_listener(
    secure: Callable[..., SecureGateway],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    wasm: dict[str, Path],
) -> None:
    if shutil.which("tcpdump") is None:
        pytest.skip("needs tcpdump")
    gw = secure(mdns=True)
    device_id = f"cam-unpaired-{uuid.uuid4().hex[:8]}"
    control_id = f"control-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("HEARTH_CONFIG_DIR", str(tmp_path / "device"))  # no pairing there
    monkeypatch.setenv("HEARTH_CLIENT_ID", device_id)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pcap = tmp_path / "lan.pcap"
    capture = _tcpdump(gw.lan.port, pcap)
    try:
        # 1. Discovery with its round-trip probe: a TCP connect, no MQTT.
        found = [
            g for g in discover(3.0, interface="127.0.0.1") if g.gateway_id == gw.gw.gateway_id
        ]
        assert found, "the gateway was not discovered"
        assert (found[0].tls, found[0].paired, found[0].rtt_probe) == (True, False, "tcp")
        assert found[0].rtt_ms is not None
        # 2. A client given the gateway discovery found (auto): runs here, says to pair first.
        with hearth.Client(found[0], placement="auto", timeout_s=5) as client:
            here = client.run_wasm(wasm["echo"], stdin=b"here")
        pair_first = (
            f"pair first: hearth pair CODE --gateway 127.0.0.1:{gw.pairing.port} "
            f"--ca-fingerprint {found[0].ca_fingerprint} --id {device_id}"
        )
        assert (here.where, here.stdout) == ("local", b"here")
        assert here.reason.startswith("no gateway reachable: gateway "), here.reason
        assert pair_first in here.reason, here.reason
        # `hearth run` told the TLS port (no mDNS here: other gateways may answer on 127.0.0.1),
        # auto: runs here, and says to pair first.
        auto = _hearth("run", "--gateway", str(gw.lan), str(wasm["echo"]), env=env, stdin=b"here")
        assert auto.returncode == 0, auto.stderr
        assert auto.stdout == b"here"
        assert b"pair first: hearth pair CODE --gateway 127.0.0.1:8884" in auto.stderr
        # 3. The same, edge: fails at once, saying why.
        edge = _hearth(
            "run", "--gateway", str(gw.lan), "--where", "edge", str(wasm["echo"]), env=env
        )
        assert edge.returncode == 4  # pairing needed (README.md, Exit codes)
        assert b"serves paired devices only (TLS)" in edge.stderr, edge.stderr
        assert b"pair first: hearth pair CODE --gateway 127.0.0.1:8884" in edge.stderr
        # 4. The library itself.
        with (
            hearth.Client(str(gw.lan), placement="edge", timeout_s=5) as client,
            pytest.raises(NotPaired) as refused,
        ):
            client.run_wasm(wasm["echo"], stdin=b"x")
        assert refused.value.command.startswith("hearth pair CODE --gateway ")
        # 5. The control.
        _plaintext_connect(gw.lan.port, control_id)
    finally:
        data = _stop(capture, pcap)
    packets, streams = _tcp_payloads(data)
    to_listener = {k: v for k, v in streams.items() if k[3] == gw.lan.port}
    assert packets > 0
    assert control_id.encode() in data, "the capture misses plaintext: it proves nothing"
    assert device_id.encode() not in data, "the device's id crossed in the clear"
    ours = [v for v in to_listener.values() if control_id.encode() not in v]
    assert ours, "the device never reached the listener: nothing was tested"
    for stream in ours:
        assert tuple(stream[:2]) == _TLS_RECORD, stream[:16]  # a ClientHello, nothing else
        assert stream[0] != _MQTT_CONNECT
        assert b"MQTT" not in stream
