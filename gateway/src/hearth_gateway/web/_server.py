"""The HTTP listener: a ``ThreadingHTTPServer`` in a named thread of its own.

Why a thread and not the daemon's loop: an HTTP client (a browser's speculative connection, a
slow scraper) may hold a connection open without sending anything; served on the loop, that
would stall jobs. The page's reads and actions do not need the loop's objects either: metrics
and recent activity come from ``Metrics`` (its own locks), tasks, devices and pairing codes go
through the owner's control socket (control.py), which the loop serves like the CLI's requests,
and the audit log is read from SQLite with a read-only connection. So this thread shares no
mutable state with the loop. ``close()`` (idempotent) stops the server and joins its thread and
every request thread (``block_on_close``): none is left running.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import sys
import threading
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from hearth.transport import BrokerAddress
from hearth_gateway.config import Config
from hearth_gateway.errors import ConfigError
from hearth_gateway.metrics import Metrics
from hearth_gateway.pki import LocalCA
from hearth_gateway.web._auth import COOKIE, web_token
from hearth_gateway.web._pages import Pages, Request, Response

__all__ = ["WebServer", "web_server_for"]

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_S = 10.0  # an idle or slow connection is dropped after this
_MAX_FORM_BYTES = 64 * 1024


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins the request threads
    pages: Pages
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = super().get_request()
        conn.settimeout(_REQUEST_TIMEOUT_S)
        if self.tls is not None:
            # Not here: this is the accepting thread, and a client that never finishes its
            # handshake would hold every other one up. The request's thread does it (setup).
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: object, client_address: object) -> None:
        # A peer that speaks plain HTTP to the TLS port, or goes away mid-request: its own
        # problem, not a traceback on the daemon's stderr.
        # socketserver calls this inside its except block: the exception is the current one.
        log.debug("web: request from %s failed: %r", client_address, sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "hearth-gateway"
    sys_version = ""

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def do_GET(self) -> None:
        self._serve("GET", b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_FORM_BYTES:
            self._send(Response.text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "form too large"))
            return
        self._serve("POST", self.rfile.read(length))

    def _serve(self, method: str, body: bytes) -> None:
        url = urlsplit(self.path)
        cookies = SimpleCookie(self.headers.get("Cookie") or "")
        cookie = cookies[COOKIE].value if COOKIE in cookies else ""
        bearer = self.headers.get("Authorization") or ""
        request = Request(
            method=method,
            path=url.path,
            query={k: v[-1] for k, v in parse_qs(url.query).items()},
            form={k: v[-1] for k, v in parse_qs(body.decode(errors="replace")).items()},
            credential=bearer.removeprefix("Bearer ").strip() if bearer else cookie,
        )
        try:
            response = self.server.pages.handle(request)
        except Exception:  # one bad request must not take the listener down
            log.exception("web: %s %s failed", method, url.path)
            response = Response.text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        self._send(response)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        # Everything the page uses comes from here: the browser is told to load nothing else.
        self.send_header(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self';"
            " connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
        )
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("web %s: %s", self.address_string(), format % args)


class WebServer:
    """The listener; ``start()`` binds and serves, ``close()`` stops (idempotent)."""

    def __init__(self, address: BrokerAddress, pages: Pages, tls: ssl.SSLContext | None) -> None:
        self.address = address
        self._pages = pages
        self._tls = tls
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else 0

    @property
    def url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{self.address.host}:{self.port}/"

    def start(self) -> None:
        server = _Server((self.address.host, self.address.port), _Handler, bind_and_activate=True)
        server.pages = self._pages
        server.tls = self._tls
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="hearth-web"
        )
        self._thread.start()

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def web_server_for(
    config: Config,
    *,
    gateway_id: str,
    state_dir: Path,
    metrics: Metrics,
    control_path: Path,
    tls_hosts: set[str] | None,
) -> WebServer | None:
    """The listener the configuration asks for: None when ``web_listen`` is empty. A listener
    off loopback needs ``web_lan = true``, and is then served over TLS with a certificate from
    the gateway's own CA (the one devices pin): the broker's server certificate, issued here for
    ``tls_hosts`` when there is no pairing service to issue it (None: pairing did, for every
    name of the box, and issuing it again for other names would undo that)."""
    if not config.web_listen:
        return None
    try:
        address = BrokerAddress.parse(config.web_listen, default_port=8787)
    except ValueError as exc:
        raise ConfigError(f"web_listen: {exc}") from None
    loopback = is_loopback(address.host)
    if not loopback and not config.web_lan:
        raise ConfigError(
            f"web_listen {config.web_listen} is not a loopback address: set web_lan = true to"
            " serve the owner's page on the LAN (TLS, token)"
        )
    tls = None
    if not loopback:
        ca = LocalCA(state_dir / "pki", gateway_id)
        if tls_hosts is not None:
            ca.ensure_server_cert(tls_hosts)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(ca.server_cert_path, ca.server_key_path)
    pages = Pages(
        gateway_id=gateway_id,
        state_dir=state_dir,
        metrics=metrics,
        control_path=control_path,
        token=web_token(state_dir),
        open_metrics=loopback,
        secure_cookie=tls is not None,
    )
    return WebServer(address, pages, tls)
