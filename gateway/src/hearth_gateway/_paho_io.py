"""paho driven by the daemon's event loop (loop.py) instead of a thread of its own: the loop
watches the client's socket and calls paho's read, write and housekeeping steps. Shared by the
broker link (link.py) and the upstream link (upstream_link.py)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import paho.mqtt.client as mqtt

from hearth_gateway.loop import Loop

__all__ = ["LoopDriven"]


class LoopDriven:
    """Base for a paho client on the loop. Subclasses set ``loop`` and ``_client``, call
    ``_watch(sock)`` once connected and ``_misc`` every second or so, and implement
    ``_lost`` (the connection broke: unwatch and reconnect as suits them)."""

    loop: Loop
    _client: mqtt.Client
    _sock: socket.socket | None = None
    _fd: int = -1  # kept: paho may close the socket before we unregister it
    _writing: bool = False  # watching for writability (paho had more than the socket took)
    _cork_depth: int = 0  # corked() blocks open: only the outermost corks and uncorks

    def _lost(self) -> None:
        raise NotImplementedError

    def _watch(self, sock: socket.socket) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self.loop.add_reader(self._fd, self._readable)
        self._flush()

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """What paho writes inside goes out in as few TCP segments as fit (TCP_CORK): an
        answer and the acknowledgements after it cost the broker one wake-up, not two."""
        sock = self._sock
        cork = getattr(socket, "TCP_CORK", None)
        if sock is None or cork is None or self._cork_depth:
            self._cork_depth += 1
            try:
                yield
            finally:
                self._cork_depth -= 1
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
        except OSError:
            yield
            return
        self._cork_depth = 1
        try:
            yield
        finally:
            self._cork_depth = 0
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, cork, 0)

    def _unwatch(self) -> None:
        if self._sock is not None:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            self._writing = False
            self._sock = None
            self._fd = -1

    def _readable(self) -> None:
        if self._client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
            self._lost()
            return
        self._flush()

    def _flush(self) -> None:
        """Write what paho has queued; if the socket is full, finish when it is writable."""
        if self._sock is None:
            return
        if self._client.want_write() and self._client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
            self._lost()
            return
        # Only a change of state touches the selector: most flushes write everything at once.
        if self._client.want_write():
            if not self._writing:
                self.loop.add_writer(self._fd, self._flush)
                self._writing = True
        elif self._writing:
            self.loop.remove_writer(self._fd)
            self._writing = False

    def _misc(self) -> None:
        if self._sock is None:
            return
        if self._client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
            self._lost()
            return
        self._flush()
