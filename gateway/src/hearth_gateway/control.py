"""The box owner's control channel: a Unix socket in the state directory (mode 0600 through the
daemon's umask), so only the user the daemon runs as (or root) can use it. ``hearth-gateway
tasks ...`` speaks the protocol's own task messages over it, as the ``admin`` owner, who sees and
controls every task; ``hearth-gateway pair`` and ``devices`` speak pairing.py's owner messages.
One request frame, one reply frame (4-byte length + MessagePack), close.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from hearth.errors import ErrorCode, HearthError
from hearth.protocol import (
    BlobChunk,
    BlobStored,
    Error,
    Reply,
    TaskControl,
    TaskInstall,
    TaskList,
    decode_reply,
    decode_request,
    encode,
)
from hearth_gateway.blobs import BlobStore, UploadRefused
from hearth_gateway.loop import Loop
from hearth_gateway.owner import (
    AdminReply,
    AdminRequest,
    decode_admin_reply,
    decode_admin_request,
)

__all__ = ["ControlServer", "call", "call_admin"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 * 1024 * 1024
_ADMIN = "admin"

TaskHandler = Callable[[str, TaskInstall | TaskControl | TaskList], Reply]
AdminHandler = Callable[[AdminRequest], AdminReply]  # pairing codes, the device registry


class ControlServer:
    def __init__(
        self,
        loop: Loop,
        path: Path,
        blobs: BlobStore,
        tasks: TaskHandler,
        admin: AdminHandler | None = None,
    ) -> None:
        self._loop = loop
        self._path = path
        self._blobs = blobs
        self._tasks = tasks
        self._admin = admin
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(8)
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._accept)
        self._closed = False

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        # Admin requests are small and local: served to completion, with a short timeout so a
        # stuck client cannot hold the loop.
        with conn:
            conn.settimeout(2.0)
            try:
                request = _read(conn)
                reply = self._handle(request)
            except (OSError, ValueError) as exc:
                log.warning("control socket: %s", exc)
                return
            with contextlib.suppress(OSError):
                _write(conn, encode(reply))

    def _handle(self, payload: bytes) -> Reply | AdminReply:
        admin = decode_admin_request(payload)
        if admin is not None:
            return self._admin_request(admin)
        try:
            request = decode_request(payload)
        except HearthError as exc:
            return Error(code=getattr(exc, "code", ErrorCode.MALFORMED), message=str(exc))
        if isinstance(request, BlobChunk):
            try:
                self._blobs.receive(_ADMIN, request)
            except UploadRefused as exc:
                return Error(code=exc.code, message=exc.message)
            return BlobStored(sha256=request.sha256, size=request.size)
        if isinstance(request, TaskInstall | TaskControl | TaskList):
            return self._tasks(_ADMIN, request)
        return Error(code=ErrorCode.UNSUPPORTED, message="the control socket serves tasks only")

    def _admin_request(self, request: AdminRequest) -> AdminReply:
        if self._admin is None:
            return Error(code=ErrorCode.UNSUPPORTED, message="pairing is off: set lan_listen")
        return self._admin(request)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._path.unlink(missing_ok=True)


def _read(conn: socket.socket) -> bytes:
    header = _recv_exact(conn, _HEADER.size)
    (length,) = _HEADER.unpack(header)
    if length > _MAX_FRAME:
        raise ValueError(f"frame of {length} bytes")
    return _recv_exact(conn, length)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ValueError("connection closed mid-frame")
        data += chunk
    return bytes(data)


def _write(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(_HEADER.pack(len(payload)) + payload)


def call(path: Path, payload: bytes, timeout_s: float = 10.0) -> Reply:
    """Client side, for the CLI: one request, one reply."""
    return decode_reply(call_raw(path, payload, timeout_s))


def call_admin(path: Path, request: AdminRequest, timeout_s: float = 10.0) -> AdminReply:
    """``call`` for the owner's pairing and registry requests."""
    return decode_admin_reply(call_raw(path, encode(request), timeout_s))


def call_raw(path: Path, payload: bytes, timeout_s: float = 10.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        conn.connect(str(path))
        _write(conn, payload)
        return _read(conn)
