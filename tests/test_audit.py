"""The audit says who tried to pair, from where, and how it ended; ``hearth-gateway audit``
narrows it by time (``--since``) and by kind (``--kind``). A real gateway with its managed
Mosquitto and TLS listeners on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hearth.pairing import PairingError, pair
from hearth.protocol.pairing import format_code, new_code
from hearth.transport import BrokerAddress
from hearth_gateway.cli import _since
from testkit.gateway import GatewayProcess
from testkit.net import free_port

FROM_LOOPBACK = re.compile(r"^pairing:pair-\S+ from 127\.0\.0\.1:\d+$")


class Audited:
    def __init__(self, gw: GatewayProcess, pairing: BrokerAddress) -> None:
        self.gw, self.pairing = gw, pairing

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "hearth_gateway.cli",
                *args,
                "--state-dir",
                str(self.gw.state_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def audit(self, *flags: str) -> list[dict[str, Any]]:
        result = self.admin("audit", "--json", "--limit", "1000", *flags)
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    def pair(self, code: str, device_id: str, directory: Path) -> None:
        ca = json.loads(self.admin("pair", "--json").stdout)["ca_fingerprint"]
        pair(
            code,
            str(self.pairing),
            ca_fingerprint=ca,
            device_id=device_id,
            directory=directory,
            timeout_s=10,
        )


@pytest.fixture
def audited(make_gateway: Callable[..., GatewayProcess]) -> Audited:
    lan = BrokerAddress("127.0.0.1", free_port())
    pairing = BrokerAddress("127.0.0.1", free_port())
    gw = make_gateway("--lan-listen", str(lan), "--pairing-listen", str(pairing), managed=True)
    return Audited(gw, pairing)


def test_pairing_attempts_are_audited_with_their_source_address_and_outcome(
    audited: Audited, tmp_path: Path
) -> None:
    with pytest.raises(PairingError):
        audited.pair(format_code(new_code()), "intruder", tmp_path / "intruder")
    code = json.loads(audited.admin("pair", "--json").stdout)["code"]
    audited.pair(code, "cam-1", tmp_path / "cam")
    attempts = audited.audit("--kind", "pair")
    pairs = [e for e in attempts if e["action"] == "pair"]
    assert [(e["decision"], e["target"]) for e in pairs] == [("refused", ""), ("allowed", "cam-1")]
    for entry in pairs:
        assert FROM_LOOPBACK.match(entry["actor"]), entry
    assert "wrong, used or expired code" in pairs[0]["reason"]
    # The codes the owner asked for are of the pairing family too; nothing else is.
    assert {e["action"] for e in attempts} == {"pair", "pair_code"}
    shown = audited.admin("audit", "--kind", "pair")
    assert "from 127.0.0.1:" in shown.stdout


def test_audit_since_and_kind_narrow_the_listing(audited: Audited, tmp_path: Path) -> None:
    audited.admin("pair", "--json")  # a pair_code row
    time.sleep(2.5)
    marker = time.time()
    assert audited.admin("devices", "revoke", "nobody").returncode == 1  # a refused revoke row
    everything = audited.audit()
    assert {e["action"] for e in everything} >= {"pair_code", "device_revoke"}
    at = dt.datetime.fromtimestamp(marker - 1).isoformat(sep=" ", timespec="seconds")
    assert [e["action"] for e in audited.audit("--since", at)] == ["device_revoke"]
    assert {e["action"] for e in audited.audit("--since", "1h")} >= {"pair_code", "device_revoke"}
    revokes = audited.audit("--kind", "device_revoke")
    assert [(e["target"], e["decision"]) for e in revokes] == [("nobody", "refused")]
    both = audited.audit("--kind", "device_revoke", "--kind", "pair_code")
    assert {e["action"] for e in both} == {"device_revoke", "pair_code"}
    # A family: the part before "_" (device: device_*), never a partial word.
    assert [e["action"] for e in audited.audit("--kind", "device")] == ["device_revoke"]
    assert audited.audit("--kind", "dev") == []
    assert audited.audit("--since", "2099-01-01") == []
    bad = audited.admin("audit", "--since", "yesterday-ish")
    assert bad.returncode == 2
    assert "--since" in bad.stderr


@pytest.mark.parametrize(
    ("text", "ago_s"), [("30s", 30), ("10m", 600), ("2h", 7200), ("7d", 7 * 86400), ("1.5h", 5400)]
)
def test_since_reads_ages(text: str, ago_s: float) -> None:
    assert abs(time.time() - ago_s - _since(text)) < 5


def test_since_reads_local_dates_and_refuses_the_rest() -> None:
    assert _since("2026-12-03 21:00") == dt.datetime(2026, 12, 3, 21, 0).astimezone().timestamp()
    with pytest.raises(ValueError, match="neither an age"):
        _since("soon")
