"""The owner's page (docs/metrics-and-web.md), driven by a real headless Chromium through
Selenium: log in, see the gateway online, pair a device from the QR code (decoded from a
screenshot of it with OpenCV), watch its job appear, pause and resume a task and read its log
lines, find the audit entry, revoke the device. A screenshot of each page lands in
build/screenshots. The browser's own network log must name no host but 127.0.0.1.

Without a browser: a wrong token gets 401, a form posted without its token gets 401 and does
nothing, the page is not on the LAN address unless enabled, and when enabled it is TLS from
the gateway's CA, with the token.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import cv2
import ifaddr
import numpy as np
import pytest

from hearth import Client
from hearth.pairing import pair
from hearth.transport import BrokerAddress
from helpers import Bus
from testkit.examples import REPO_ROOT
from testkit.gateway import GatewayProcess
from testkit.net import free_port
from testkit.wait import wait_until

SCREENSHOTS = REPO_ROOT / "build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@dataclass
class OwnerGateway:
    gw: GatewayProcess
    web: str  # http://127.0.0.1:PORT
    lan: BrokerAddress
    pairing: BrokerAddress

    @property
    def token(self) -> str:
        return (self.gw.state_dir / "web-token").read_text().strip()


@pytest.fixture
def owner_gateway(make_gateway: Callable[..., GatewayProcess]) -> OwnerGateway:
    """A gateway with device and pairing listeners and the page, all on 127.0.0.1."""
    port = free_port()
    lan = BrokerAddress("127.0.0.1", free_port())
    pairing = BrokerAddress("127.0.0.1", free_port())
    gw = make_gateway(
        "--lan-listen",
        str(lan),
        "--pairing-listen",
        str(pairing),
        "--web-listen",
        f"127.0.0.1:{port}",
        managed=True,
    )
    return OwnerGateway(gw, f"http://127.0.0.1:{port}", lan, pairing)


def _http(
    url: str, data: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    body = urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- the browser -----------------------------------------------------------------------------------


class Browser:
    """Chromium under chromedriver, with its network log kept for the end of the test."""

    def __init__(self, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        # The driver's path given: Selenium Manager (which could download one) is not used.
        self.driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        self.requests: list[str] = []

    def collect(self) -> None:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])

    def get(self, url: str) -> None:
        self.driver.get(url)
        self.collect()

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def click(self, css: str) -> None:
        """Click what navigates (a link, a form's button) and wait for the next page."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        page = self.find("html")
        self.find(css).click()
        stale = expected_conditions.staleness_of(page)

        def left(driver: Any) -> bool:
            try:
                return bool(stale(driver))
            except WebDriverException as exc:
                # Mid-navigation chromedriver may answer about the old page's node with an
                # inspector error instead of "stale element": the page is going, all the same.
                if "does not belong to the document" in str(exc):
                    return True
                raise

        WebDriverWait(self.driver, 15).until(left)
        self.collect()

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.geteuid() == 0:
            pytest.fail("chromium and chromium-driver are missing: run scripts/bootstrap.sh")
        pytest.skip("needs chromium and chromium-driver (Debian), installed as root by bootstrap")
    pytest.importorskip("selenium")
    # Selenium Manager is not needed (the driver's path is given); were it run, it must
    # neither download a driver nor report usage.
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def _qr_content(png: bytes) -> str:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    text, _points, _ = cv2.QRCodeDetector().detectAndDecode(image)
    return str(text)


def _tasks_dir(examples: Path) -> Path:
    path = examples / "tasks"
    if not (path / "counter.wasm").exists():
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "build_examples.py")], check=True
        )
    return path


def test_the_owner_drives_the_page_in_a_real_browser(
    owner_gateway: OwnerGateway,
    browser: Browser,
    wasm: dict[str, Path],
    examples: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    og, b = owner_gateway, browser
    # Log in: a wrong token first, then the one `hearth-gateway web-token` prints.
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "web-token",
            "--state-dir",
            str(og.gw.state_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert printed == og.token
    b.get(og.web + "/")
    b.find("#token").send_keys("not-the-token")
    b.click("#login")
    assert "wrong token" in b.find("#login-error").text
    b.shot("00-login")
    b.find("#token").send_keys(printed)
    b.click("#login")
    assert b.find("#state").text == "online"
    assert b.finds("#load-line")  # the charts
    b.shot("01-status")

    # Pair a device from the QR code's content.
    b.click("a[href='/devices']")
    b.click("button.primary")
    qr = b.find("#qr")
    content = _qr_content(qr.screenshot_as_png)
    assert content == qr.get_attribute("data-pair")
    assert content.startswith("hearth://pair?")
    b.shot("02-pair")
    fields = {k: v[0] for k, v in parse_qs(urlsplit(content).query).items()}
    assert fields["code"] == b.find("#pair-code").text
    device_dir = tmp_path / "device"
    monkeypatch.setenv("HEARTH_CONFIG_DIR", str(device_dir))
    paired = pair(
        fields["code"],
        fields["addr"],
        ca_fingerprint=fields["ca"],
        device_id="web-cam",
        directory=device_dir,
        timeout_s=10,
    )
    assert paired.device_id == "web-cam"
    b.get(og.web + "/devices")
    assert "web-cam" in b.find("#devices").text
    b.shot("03-devices")

    # The device's job appears, with where it ran and why.
    with Client(str(og.lan), placement="edge", timeout_s=20) as device:
        run = device.run_wasm(wasm["echo"], stdin=b"from the porch")
    assert run.stdout == b"from the porch"
    b.get(og.web + "/jobs")
    recent = b.find("#recent").text
    assert "web-cam" in recent
    assert "private: stays on this gateway" in recent
    b.shot("04-jobs")

    # A task: pause it, resume it, read its log line (a failed event says why).
    base = f"test/{uuid.uuid4().hex[:8]}"
    with og.gw.client() as owner:
        info = owner.install_task(
            _tasks_dir(examples) / "counter.wasm",
            "counter",
            on=[f"{base}/in"],
            may_publish=[f"{base}/out"],
            config={"out_topic": f"{base}/out"},
        )
    b.get(og.web + "/tasks")
    section = f"#task-{info.task_id}"
    assert b.find(f"{section} .task-state").text == "running"
    b.click(f"{section} button[value='Pause']")
    assert b.find(f"{section} .task-state").text == "paused"
    assert "paused" in b.find("#note").text
    b.shot("05-task-paused")
    b.click(f"{section} button[value='Resume']")
    assert b.find(f"{section} .task-state").text == "running"
    with Bus(og.gw.listen) as bus:
        bus.publish(f"{base}/in", b"trap")  # the counter traps on this payload

        def logged() -> bool:
            b.get(og.web + "/tasks")
            return "event failed" in b.find(f"{section} pre.log").text

        assert wait_until(logged, 15, step_s=0.5)
    b.shot("06-task-log")

    # The audit log, filtered to the pause.
    b.get(og.web + "/audit")
    b.find("input[name='action']").send_keys("task_pause")
    b.click("form.filters button")
    audit = b.find("#audit").text
    assert "task_pause" in audit
    assert info.task_id in audit
    assert "task_resume" not in audit
    b.shot("07-audit")

    # Revoke the device.
    b.get(og.web + "/devices")
    b.click("#devices button[value='Revoke']")
    assert "revoked web-cam" in b.find("#note").text
    assert "revoked" in b.find("#devices").text
    b.shot("08-revoked")
    b.get(og.web + "/audit?action=device_revoke")
    assert "web-cam" in b.find("#audit").text

    # Nothing was asked of any host but this one.
    b.collect()
    web = [urlsplit(url) for url in b.requests]
    hosts = {u.hostname for u in web if u.scheme in ("http", "https", "ws", "wss")}
    assert b.requests
    assert hosts == {"127.0.0.1"}, f"requests to other hosts: {sorted(b.requests)}"


# -- without a browser -------------------------------------------------------------------------


def test_a_wrong_token_gets_401(owner_gateway: OwnerGateway) -> None:
    og = owner_gateway
    assert _http(og.web + "/")[0] == 401
    assert _http(og.web + "/login", {"token": "wrong"})[0] == 401
    assert _http(og.web + "/devices", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert _http(og.web + "/devices", headers={"Cookie": "hearth_web=wrong"})[0] == 401
    status, _ = _http(og.web + "/devices", headers={"Authorization": f"Bearer {og.token}"})
    assert status == 200
    # On loopback, a scraper needs no token for /metrics.
    assert _http(og.web + "/metrics")[0] == 200


def test_form_posts_without_the_token_are_refused_and_do_nothing(
    owner_gateway: OwnerGateway,
) -> None:
    og = owner_gateway
    cookie = {"Cookie": f"hearth_web={og.token}"}
    for path, form in (
        ("/devices/pair", {}),
        ("/devices/revoke", {"device_id": "cam-1"}),
        ("/tasks/control", {"task_id": "t-1", "action": "cancel"}),
    ):
        assert _http(og.web + path, form, cookie)[0] == 401
        assert _http(og.web + path, {**form, "csrf": "0" * 64}, cookie)[0] == 401
    audit = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "audit",
            "--json",
            "--state-dir",
            str(og.gw.state_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "pair_code" not in audit  # no code was issued
    assert og.gw.snapshot().state == "online"


def _lan_address() -> str | None:
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and not str(ip.ip).startswith("127."):
                return str(ip.ip)
    return None


def test_the_page_is_not_on_the_lan_unless_enabled(
    owner_gateway: OwnerGateway, make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    address = _lan_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    port = int(urlsplit(owner_gateway.web).port or 0)
    with pytest.raises(OSError), socket.create_connection((address, port), timeout=3):
        pass
    # Off loopback without web_lan: a configuration error, not a page on the LAN.
    conf = tmp_path / "lan.toml"
    conf.write_text(f'web_listen = "0.0.0.0:{free_port()}"\n')
    gw = make_gateway("--config", str(conf), start=False)
    with pytest.raises(RuntimeError, match="web_lan"):
        gw.start(timeout_s=30)
    # Enabled: TLS from the gateway's own CA, and the token.
    lan_port = free_port()
    conf.write_text(f'web_listen = "0.0.0.0:{lan_port}"\nweb_lan = true\n')
    gw = make_gateway("--config", str(conf))
    context = ssl.create_default_context(cafile=str(gw.state_dir / "pki" / "ca.pem"))
    url = f"https://{address}:{lan_port}/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10, context=context)
    assert refused.value.code == 401
    token = (gw.state_dir / "web-token").read_text().strip()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        assert 'id="state"' in response.read().decode()
    # Plain HTTP on the LAN listener gets nowhere.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{address}:{lan_port}/", timeout=5)
