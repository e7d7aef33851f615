"""The owner's pages: routing, the token checks, and server-rendered HTML.

Reads: ``Metrics`` (jobs, task log lines, the charts' series), the status snapshot the daemon
writes (status.py), the audit table (read-only SQLite, audit_log.py). Actions and what only the
loop knows (tasks, devices, pairing codes) go through the owner's control socket, the same
requests ``hearth-gateway tasks|pair|devices`` send: one place decides them (control.py).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from html import escape
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from urllib.parse import quote, urlencode

import segno
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hearth.errors import ErrorCode
from hearth.protocol import Error, Reply, Task, TaskControl, TaskInfo, TaskList, TaskListResult
from hearth.protocol import encode as encode_message
from hearth_gateway.audit_log import AuditFilter, read_audit
from hearth_gateway.control import call, call_admin
from hearth_gateway.metrics import JobRecord, Metrics
from hearth_gateway.owner import (
    AdminReply,
    CodeIssued,
    CodeRequest,
    DeviceInfo,
    DeviceList,
    DeviceListRequest,
    DeviceRevoke,
)
from hearth_gateway.status import read_snapshot
from hearth_gateway.web._auth import COOKIE, csrf_for, same

__all__ = ["Pages", "Request", "Response"]

_STATIC = {"style.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}
_NAV = (
    ("/", "Status"),
    ("/devices", "Devices"),
    ("/jobs", "Jobs"),
    ("/tasks", "Tasks"),
    ("/audit", "Audit"),
)
_TASK_ACTIONS = ("pause", "resume", "cancel")
_CONTROL_TIMEOUT_S = 5.0
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    form: dict[str, str] = field(default_factory=dict)
    credential: str = ""  # the cookie's token, or a bearer token


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @staticmethod
    def html(status: int, body: str) -> Response:
        return Response(status, [("Content-Type", "text/html; charset=utf-8")], body.encode())

    @staticmethod
    def text(status: int, body: str) -> Response:
        return Response(status, [("Content-Type", "text/plain; charset=utf-8")], body.encode())

    @staticmethod
    def redirect(location: str, *headers: tuple[str, str]) -> Response:
        return Response(HTTPStatus.SEE_OTHER, [("Location", location), *headers], b"")


@cache
def _template(name: str) -> string.Template:
    return string.Template((resources.files(__package__) / "templates" / name).read_text())


@cache
def _static(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return dt.datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: list[str], rows: list[list[str]], table_id: str) -> str:
    """Rows are HTML already (each cell escaped by its caller)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>'
    return f'<table id="{table_id}">{thead}<tbody>{body}</tbody></table>'


def _polyline(points: list[tuple[float, float]], height: float, top: float) -> str:
    """SVG points for values on a 300 x ``height`` chart whose top is ``top``."""
    if not points:
        return ""
    first, last = points[0][0], points[-1][0]
    span = max(1e-9, last - first)
    scale = height / max(1e-9, top)
    return " ".join(
        f"{300 * (t - first) / span:.1f},{height - min(height, v * scale):.1f}" for t, v in points
    )


class Pages:
    def __init__(
        self,
        *,
        gateway_id: str,
        state_dir: Path,
        metrics: Metrics,
        control_path: Path,
        token: str,
        open_metrics: bool,
        secure_cookie: bool,
    ) -> None:
        self._gateway_id = gateway_id
        self._state_dir = state_dir
        self._metrics = metrics
        self._control = control_path
        self._token = token
        self._csrf = csrf_for(token)
        self._open_metrics = open_metrics  # loopback: scrapers need no token
        self._secure_cookie = secure_cookie

    # -- routing ---------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:  # noqa: PLR0911 (one line per route)
        path = request.path
        if path.startswith("/static/") and request.method == "GET":
            return self._static_file(path.removeprefix("/static/"))
        if path == "/login":
            return self._login(request)
        authed = same(request.credential, self._token)
        if path == "/metrics" and request.method == "GET" and (authed or self._open_metrics):
            body = self._metrics.exposition()
            return Response(HTTPStatus.OK, [("Content-Type", CONTENT_TYPE_LATEST)], body)
        if not authed:
            return self._login_page(HTTPStatus.UNAUTHORIZED, "")
        if request.method == "POST" and not same(request.form.get("csrf", ""), self._csrf):
            # A post without the form's token: another site's form, or a forged request.
            return Response.text(
                HTTPStatus.UNAUTHORIZED, "refused: the form lacks the owner's token"
            )
        route = self._routes().get((request.method, path))
        if route is None:
            return Response.text(HTTPStatus.NOT_FOUND, "not found")
        return route(request)

    def _routes(self) -> dict[tuple[str, str], Callable[[Request], Response]]:
        return {
            ("GET", "/"): self._status,
            ("GET", "/devices"): self._devices,
            ("POST", "/devices/pair"): self._pair,
            ("POST", "/devices/revoke"): self._revoke,
            ("GET", "/jobs"): self._jobs,
            ("GET", "/tasks"): self._tasks,
            ("POST", "/tasks/control"): self._task_control,
            ("GET", "/audit"): self._audit,
            ("GET", "/api/series"): self._series,
            ("POST", "/logout"): self._logout,
        }

    def _static_file(self, name: str) -> Response:
        kind = _STATIC.get(name)
        if kind is None:
            return Response.text(HTTPStatus.NOT_FOUND, "not found")
        return Response(HTTPStatus.OK, [("Content-Type", kind)], _static(name))

    # -- logging in ------------------------------------------------------------------------------

    def _login(self, request: Request) -> Response:
        if request.method != "POST":
            return self._login_page(HTTPStatus.OK, "")
        if not same(request.form.get("token", "").strip(), self._token):
            return self._login_page(HTTPStatus.UNAUTHORIZED, "wrong token")
        flags = "; Secure" if self._secure_cookie else ""
        cookie = f"{COOKIE}={self._token}; Path=/; HttpOnly; SameSite=Strict{flags}"
        return Response.redirect("/", ("Set-Cookie", cookie))

    def _logout(self, _request: Request) -> Response:
        return Response.redirect("/login", ("Set-Cookie", f"{COOKIE}=; Path=/; Max-Age=0"))

    def _login_page(self, status: int, message: str) -> Response:
        body = _template("login.html").substitute(
            gateway=escape(self._gateway_id), message=escape(message)
        )
        return Response.html(status, body)

    def _page(self, title: str, body: str, note: str = "") -> Response:
        nav = "".join(f'<a href="{href}">{escape(name)}</a>' for href, name in _NAV)
        html = _template("layout.html").substitute(
            title=escape(title),
            gateway=escape(self._gateway_id),
            nav=nav,
            note=f'<p class="note" id="note">{escape(note)}</p>' if note else "",
            body=body,
            csrf=self._csrf,
        )
        return Response.html(HTTPStatus.OK, html)

    def _form(self, action: str, fields: dict[str, str], label: str, css: str = "") -> str:
        hidden = "".join(
            f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">'
            for k, v in {"csrf": self._csrf, **fields}.items()
        )
        return (
            f'<form method="post" action="{action}" class="inline">{hidden}'
            f'<button type="submit" class="{css}" name="do" value="{escape(label)}">'
            f"{escape(label)}</button></form>"
        )

    # -- the control socket ----------------------------------------------------------------------

    def _admin(self, request: CodeRequest | DeviceListRequest | DeviceRevoke) -> AdminReply:
        try:
            return call_admin(self._control, request, _CONTROL_TIMEOUT_S)
        except OSError as exc:
            return Error(code=ErrorCode.INTERNAL, message=f"the daemon's control socket: {exc}")

    def _task_call(self, request: TaskList | TaskControl) -> Reply:
        try:
            return call(self._control, encode_message(request), _CONTROL_TIMEOUT_S)
        except OSError as exc:
            return Error(code=ErrorCode.INTERNAL, message=f"the daemon's control socket: {exc}")

    # -- pages -----------------------------------------------------------------------------------

    def _status(self, request: Request) -> Response:
        snapshot = read_snapshot(self._state_dir)
        sample = self._metrics.state()
        state = snapshot.state if snapshot is not None else "unknown"
        rows = [
            ["state", f'<span id="state" class="{escape(state)}">{escape(state)}</span>'],
            ["broker", "connected" if sample.broker_connected else "not connected"],
            ["workers", f"{sample.busy_workers} busy of {sample.workers}"],
            ["queue", str(sample.queue_depth)],
            ["paired devices", str(sample.paired_devices)],
            ["tasks", ", ".join(f"{n} {s}" for s, n in sorted(sample.tasks.items()) if n) or "0"],
            ["stored blobs", f"{sample.blobs} ({sample.blob_bytes} bytes)"],
            ["storage free", f"{sample.storage_free_bytes / 2**30:.1f} GiB"],
        ]
        if snapshot is not None:
            rows += [
                ["version", escape(snapshot.version)],
                [
                    "jobs",
                    f"{snapshot.jobs_accepted} accepted, {snapshot.jobs_completed} answered,"
                    f" {snapshot.jobs_refused} refused",
                ],
                ["since", _when(snapshot.started_at)],
            ]
        table = _table(["", ""], [[escape(k), v] for k, v in rows], "status")
        return self._page("Status", table + self._charts(), request.query.get("note", ""))

    def _charts(self) -> str:
        series = self._metrics.series()
        load = [(t, v) for t, v, _p50, _max in series]
        p50 = [(t, v) for t, _l, v, _max in series]
        worst = [(t, v) for t, _l, _p50, v in series]
        top_ms = max([v for _, v in worst] + [1.0])
        top_load = max([v for _, v in load] + [1.0])
        return (
            '<h2>Load and latency</h2><div class="charts">'
            f'<figure><figcaption>load (jobs per worker), top <span id="load-top">'
            f'{top_load:.1f}</span></figcaption><svg viewBox="0 0 300 80" class="chart">'
            f'<polyline id="load-line" points="{_polyline(load, 80, top_load)}"/></svg></figure>'
            f'<figure><figcaption>latency ms (median, max), top <span id="ms-top">{top_ms:.0f}'
            '</span></figcaption><svg viewBox="0 0 300 80" class="chart">'
            f'<polyline id="p50-line" points="{_polyline(p50, 80, top_ms)}"/>'
            f'<polyline id="max-line" class="max" points="{_polyline(worst, 80, top_ms)}"/>'
            "</svg></figure></div>"
        )

    def _series(self, _request: Request) -> Response:
        body = json.dumps([list(point) for point in self._metrics.series()])
        return Response(HTTPStatus.OK, [("Content-Type", "application/json")], body.encode())

    def _devices(self, request: Request) -> Response:
        reply = self._admin(DeviceListRequest())
        if isinstance(reply, Error):
            body = f'<p class="error">{escape(reply.message)}</p>'
        else:
            assert isinstance(reply, DeviceList)
            body = _table(
                ["device", "paired", "state", "certificate", ""],
                [self._device_row(d) for d in reply.devices],
                "devices",
            )
        pair = self._form("/devices/pair", {}, "Pair a new device", "primary")
        return self._page("Devices", pair + body, request.query.get("note", ""))

    def _device_row(self, d: DeviceInfo) -> list[str]:
        revoked = d.revoked_at is not None
        state = f"revoked {_when(d.revoked_at)}" if revoked else "paired"
        action = (
            "" if revoked else self._form("/devices/revoke", {"device_id": d.device_id}, "Revoke")
        )
        return [
            escape(d.device_id),
            _when(d.paired_at),
            escape(state),
            escape(d.fingerprint[:16]),
            action,
        ]

    def _pair(self, _request: Request) -> Response:
        reply = self._admin(CodeRequest())
        if not isinstance(reply, CodeIssued):
            message = reply.message if isinstance(reply, Error) else "unexpected reply"
            return self._page("Pair a device", f'<p class="error">{escape(message)}</p>')
        host = reply.addresses[0] if reply.addresses else ""
        params = {"code": reply.code, "ca": reply.ca_fingerprint, "gateway": reply.gateway_id}
        if host:
            params["addr"] = f"{host}:{reply.pairing_port}"
        content = "hearth://pair?" + urlencode(params, quote_via=quote)
        qr = segno.make(content, error="m").svg_inline(scale=5, border=4, dark="#000", light="#fff")
        command = f"hearth pair {reply.code}"
        if host:
            command += f" --gateway {host}:{reply.pairing_port}"
        command += f" --ca-fingerprint {reply.ca_fingerprint}"
        body = (
            f'<div class="pair"><div id="qr" data-pair="{escape(content)}">{qr}</div>'
            f'<p>One-time code <code id="pair-code">{escape(reply.code)}</code>, valid until '
            f'{_when(reply.expires_at)}.</p><p>CA fingerprint <code id="ca-fingerprint">'
            f"{escape(reply.ca_fingerprint)}</code></p><p>On the device:</p>"
            f"<pre>{escape(command)}</pre></div>"
        )
        return self._page("Pair a device", body)

    def _revoke(self, request: Request) -> Response:
        device_id = request.form.get("device_id", "")
        if not _ID.match(device_id):
            return Response.text(HTTPStatus.BAD_REQUEST, "bad device id")
        reply = self._admin(DeviceRevoke(device_id=device_id))
        note = reply.message if isinstance(reply, Error) else f"revoked {device_id}"
        return Response.redirect("/devices?" + urlencode({"note": note}))

    def _jobs(self, request: Request) -> Response:
        def row(j: JobRecord) -> list[str]:
            latency = "-" if j.total_s is None else f"{j.total_s * 1e3:.1f} ms"
            texts = (j.client_id, j.job_id, j.runner, j.where, j.why, j.outcome or "running")
            return [_when(j.accepted_at), *(escape(t) for t in texts), latency]

        headers = ["accepted", "device", "job", "runner", "where", "why", "outcome", "latency"]
        body = (
            "<h2>In flight</h2>"
            + _table(headers, [row(j) for j in self._metrics.jobs_in_flight()], "in-flight")
            + "<h2>Recent</h2>"
            + _table(headers, [row(j) for j in self._metrics.jobs_recent()], "recent")
        )
        return self._page("Jobs", body, request.query.get("note", ""))

    def _tasks(self, request: Request) -> Response:
        reply = self._task_call(TaskList())
        if not isinstance(reply, TaskListResult):
            message = reply.message if isinstance(reply, Error) else "unexpected reply"
            return self._page("Tasks", f'<p class="error">{escape(message)}</p>')
        sections = [self._task_section(t) for t in reply.tasks] or ['<p class="empty">none</p>']
        return self._page("Tasks", "".join(sections), request.query.get("note", ""))

    def _task_section(self, t: TaskInfo) -> str:
        actions = {
            "running": ("pause", "cancel"),
            "paused": ("resume", "cancel"),
            "suspended": ("resume", "cancel"),
        }.get(t.state, ())
        buttons = "".join(
            self._form("/tasks/control", {"task_id": t.task_id, "action": a}, a.capitalize())
            for a in actions
        )
        facts = (
            f"{t.events} events, {t.failures} failed, {t.publishes} published,"
            f" {t.refused} refused, {t.dropped} dropped; last event {_when(t.last_event_at)}"
        )
        reason = f" ({escape(t.reason)})" if t.reason else ""
        lines = self._metrics.task_lines(t.task_id)
        log_text = "\n".join(f"{_when(at)}  {line}" for at, line in lines) or "(no log lines yet)"
        tid = escape(t.task_id)
        return (
            f'<section class="task" id="task-{tid}"><h2>{escape(t.name)} <small>{tid}</small></h2>'
            f'<p>owner {escape(t.owner)}; state <span class="task-state">{escape(t.state)}</span>'
            f"{reason}</p><p>{escape(facts)}</p>{buttons}"
            f'<pre class="log">{escape(log_text)}</pre></section>'
        )

    def _task_control(self, request: Request) -> Response:
        task_id, action = request.form.get("task_id", ""), request.form.get("action", "")
        if action not in _TASK_ACTIONS or not _ID.match(task_id):
            return Response.text(HTTPStatus.BAD_REQUEST, "bad task id or action")
        reply = self._task_call(TaskControl(task_id=task_id, action=action))  # type: ignore[arg-type]
        if isinstance(reply, Task):
            note = f"{task_id}: {reply.task.state}"
        else:
            note = reply.message if isinstance(reply, Error) else "unexpected reply"
        return Response.redirect("/tasks?" + urlencode({"note": note}))

    def _audit(self, request: Request) -> Response:
        q = request.query
        try:
            limit = max(1, min(1000, int(q.get("limit") or 100)))
        except ValueError:
            limit = 100
        wanted = AuditFilter(
            limit=limit,
            kinds=[k for k in (q.get("action") or "").split(",") if k.strip()],
            actor=q.get("actor", "").strip(),
            decision=q.get("decision", "").strip(),
            text=q.get("text", "").strip(),
        )
        rows = read_audit(self._state_dir / "hearth.sqlite3", wanted)
        decision_options = "".join(
            f'<option value="{d}"{" selected" * (d == wanted.decision)}>{d or "any"}</option>'
            for d in ("", "allowed", "refused")
        )
        form = (
            '<form method="get" action="/audit" class="filters">'
            f'<label>actor <input name="actor" value="{escape(wanted.actor)}"></label>'
            f'<label>action <input name="action" value="{escape(q.get("action", ""))}"></label>'
            f'<label>decision <select name="decision">{decision_options}</select></label>'
            f'<label>text <input name="text" value="{escape(wanted.text)}"></label>'
            f'<label>limit <input name="limit" value="{limit}" size="4"></label>'
            '<button type="submit">Filter</button></form>'
        )
        table = _table(
            ["time", "actor", "action", "target", "decision", "reason"],
            [[_when(r.at), *(escape(str(v)) for v in r[1:])] for r in rows],
            "audit",
        )
        return self._page("Audit", form + table)
