"""The systemd unit (checked by systemd-analyze) and the sd_notify helper (on real sockets)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hearth_gateway._systemd import credentials_dir, notify, watchdog_interval_s

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "hearth-gateway.service"
# Every unit shipped is held to the same promise.
UNITS = sorted((REPO / "systemd").glob("*.service"))
# The example drop-in for a gateway with a cloud tier: lifts the LAN-only IP filter.
CLOUD_DROP_IN = REPO / "systemd" / "cloud-tier.conf"
INSTALLED_EXEC = "/opt/hearth/venv/bin/hearth-gateway"
# The figures docs/systemd.md reports are 1.5 (the unit) and 1.6 (with the cloud-tier
# drop-in); 2.0 is the promise.
MAX_EXPOSURE = 2.0
# What a LAN-only gateway must still reach: loopback, link-local, the mDNS groups, private ranges.
LAN_ALLOW = {
    "localhost",
    "link-local",
    "fe80::/10",
    "224.0.0.251",
    "ff02::fb",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
}

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)"
)


def _systemd_version() -> int | None:
    if SYSTEMD_ANALYZE is None:
        return None
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else None


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "--no-pager", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        check=False,
        timeout=120,
    )


def _existing_executable(tmp_path: Path) -> str:
    """A real executable to stand in for the installed one: verify checks ExecStart exists."""
    venv_script = Path(sys.executable).parent / "hearth-gateway"
    if venv_script.is_file() and os.access(venv_script, os.X_OK):
        return str(venv_script)
    stub = tmp_path / "hearth-gateway"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return str(stub)


def _copy(unit_text: str, tmp_path: Path, drop_in: str | None = None) -> Path:
    """The unit alone in a directory of its own (plus ``drop_in`` in its .d directory, where
    systemd-analyze picks it up): nothing else beside it may change what is measured."""
    copy = tmp_path / "units" / UNIT.name
    copy.parent.mkdir(exist_ok=True)
    copy.write_text(unit_text)
    if drop_in is not None:
        conf = copy.parent / f"{UNIT.name}.d" / CLOUD_DROP_IN.name
        conf.parent.mkdir(exist_ok=True)
        conf.write_text(drop_in)
    return copy


def _exposure(unit: Path) -> tuple[float, str]:
    result = _analyze("security", "--offline=true", str(unit))
    match = re.search(
        rf"Overall exposure level for {re.escape(unit.name)}: (\d+(?:\.\d+)?)", result.stdout
    )
    assert match, result.stdout + result.stderr
    return float(match.group(1)), result.stdout


def _verify(unit_text: str, tmp_path: Path, drop_in: str | None = None) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on a copy of the unit; return rc and lines about it."""
    assert INSTALLED_EXEC in unit_text, "ExecStart moved: update INSTALLED_EXEC and the docs"
    text = unit_text.replace(INSTALLED_EXEC, _existing_executable(tmp_path))
    copy = _copy(text, tmp_path, drop_in)
    # --man=no: whether man pages are installed is the host's business, not the unit's.
    # --recursive-errors=no: errors in the host's own units are not ours either.
    result = _analyze("verify", "--man=no", "--recursive-errors=no", str(copy))
    output = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in output if UNIT.name in line or UNIT.stem in line]


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    version = _systemd_version()
    if version is not None and version < 250:
        pytest.skip(f"systemd {version} lacks verify --recursive-errors (needs 250+)")
    rc, about_unit = _verify(UNIT.read_text(), tmp_path)
    assert about_unit == []
    assert rc == 0


@needs_analyze
def test_verify_check_is_not_vacuous(tmp_path: Path) -> None:
    """A broken copy must be reported, or test_unit_verifies proves nothing on this host."""
    version = _systemd_version()
    if version is not None and version < 250:
        pytest.skip(f"systemd {version} lacks verify --recursive-errors (needs 250+)")
    broken = UNIT.read_text().replace("[Service]\n", "[Service]\nNoSuchSetting=1\n", 1)
    _, about_unit = _verify(broken, tmp_path)
    assert any("NoSuchSetting" in line for line in about_unit), about_unit


def _needs_offline_security() -> None:
    version = _systemd_version()
    if version is None or version < 250:
        pytest.skip(f"systemd {version} lacks `systemd-analyze security --offline` (needs 250+)")


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_security_exposure(unit: Path, tmp_path: Path) -> None:
    _needs_offline_security()
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text())
    exposure, report = _exposure(copy)
    assert exposure <= MAX_EXPOSURE, report
    # The LAN-only IP filter is in force, and systemd-analyze sees it.
    assert "IP address allow list with non-localhost entries" in report, report


def _ip_lists(text: str) -> tuple[list[str], list[str]]:
    deny: list[str] = []
    allow: list[str] = []
    for key, value in re.findall(r"^\s*(IPAddressDeny|IPAddressAllow)\s*=(.*)$", text, re.M):
        target = deny if key == "IPAddressDeny" else allow
        if not value.strip():
            target.clear()  # an empty assignment resets the list
        target.extend(value.split())
    return deny, allow


def test_unit_limits_ip_traffic_to_the_lan() -> None:
    deny, allow = _ip_lists(UNIT.read_text())
    assert deny == ["any"]
    assert set(allow) == LAN_ALLOW
    # Multicast: only the mDNS groups (link-scoped: routers do not forward them).
    for entry in set(allow) - {"localhost", "link-local", "224.0.0.251", "ff02::fb"}:
        net = ipaddress.ip_network(entry)
        assert net.is_private or net.is_link_local, entry
        assert not net.is_global, entry


def test_cloud_tier_drop_in_lifts_the_filter() -> None:
    deny, _ = _ip_lists(UNIT.read_text() + CLOUD_DROP_IN.read_text())
    assert deny == []  # nothing denied: everything passes


@needs_analyze
def test_cloud_tier_drop_in_verifies_and_keeps_the_exposure(tmp_path: Path) -> None:
    version = _systemd_version()
    if version is not None and version < 250:
        pytest.skip(f"systemd {version} lacks verify --recursive-errors (needs 250+)")
    rc, about_unit = _verify(UNIT.read_text(), tmp_path, CLOUD_DROP_IN.read_text())
    assert about_unit == []
    assert rc == 0
    if version is not None and version >= 250:  # security --offline, as above
        exposure, report = _exposure(tmp_path / "units" / UNIT.name)
        assert exposure <= MAX_EXPOSURE, report
        assert "does not define an IP address allow list" in report, report
    # Not vacuous: a mistake in the drop-in is reported.
    _, about_broken = _verify(UNIT.read_text(), tmp_path, CLOUD_DROP_IN.read_text() + "Bad=1\n")
    assert any("Bad" in line for line in about_broken), about_broken


def test_unit_allows_jit() -> None:
    """wasmtime JIT-compiles to W+X memory; MemoryDenyWriteExecute would break every wasm job."""
    settings = re.findall(r"^\s*MemoryDenyWriteExecute\s*=\s*(\S*)", UNIT.read_text(), re.M)
    assert all(value.lower() in {"", "no", "false", "0", "off"} for value in settings), settings


# --- hearth_gateway._systemd ---------------------------------------------------------------

_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite may itself run under systemd (a CI runner service): never ping the real one.
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket and its filesystem path."""
    path = tmp_path / "notify.sock"
    short_dir = None
    if len(os.fsencode(path)) >= 100:  # sun_path holds 108 bytes; long $TMPDIRs exceed it
        short_dir = tempfile.mkdtemp(prefix="hearth-", dir="/tmp")
        path = Path(short_dir) / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)
    if short_dir is not None:
        shutil.rmtree(short_dir)


def test_notify_sends_one_datagram(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1", "STATUS=serving on 127.0.0.1:1883") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:1883"
    assert notify("WATCHDOG=1") is True
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"hearth-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STOPPING=1") is True
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_outside_systemd_is_noop() -> None:
    assert notify("READY=1") is False


def test_notify_unsupported_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify("READY=1") is False


def test_notify_missing_socket_logs_and_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify("WATCHDOG=1") is False
    assert "sd_notify" in caplog.text


@pytest.mark.parametrize("state", ["READY=1\nMAINPID=1", "READY", "=1"])
def test_notify_rejects_malformed_state(state: str) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notify(state)


@pytest.mark.parametrize(
    ("usec", "pid", "expected_s"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("1000", None, 0.0005),
        ("0", None, None),
        ("-5", None, None),
        ("30s", None, None),
        ("30000000", "not-a-pid", None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected_s: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert watchdog_interval_s() == expected_s


def test_credentials_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert credentials_dir() is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert credentials_dir() == tmp_path
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "relative/dir")
    assert credentials_dir() is None
