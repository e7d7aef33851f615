"""What every group of ``hearth.Client``'s calls shares: the device's id, the link to its
gateway, the blobs it names, and the way a job reaches the gateway. The groups build on it:
vision (``hearth.vision``), persistent tasks (``hearth._tasks``), and the WebAssembly and ONNX
calls with their placement (``hearth.client``)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Self

import msgspec

from hearth._blobs import Blob, BlobCache, UploadProgress
from hearth._connection import Connection
from hearth._gateway import GatewayLink
from hearth._identity import ENV_CLIENT_ID, default_client_id
from hearth._offload import Job, Offloader
from hearth._results import Stats
from hearth.discovery import GatewayInfo
from hearth.errors import ErrorCode, JobError, NotPaired
from hearth.placement import Placement
from hearth.protocol import AppUsage, Error, Reply, Usage, UsageResult

__all__ = ["ClientCore"]


class ClientCore:
    app: str | None = None  # the application calls are for (Client's ``app``; quotas)

    def __init__(
        self,
        gateway: GatewayInfo | str | None,
        *,
        client_id: str | None,
        interface: str | None,
        timeout_s: float,
        retries: int,
        discover_timeout_s: float,
        qos: int,
    ) -> None:
        self.timeout_s = timeout_s
        self.retries = retries
        # QoS 1 (the default) lets the broker's acknowledgements cover each hop; QoS 0 trades
        # that for latency on a LAN, and the journal and retries still make jobs run once.
        self.qos = qos
        self.stats = Stats()
        self._link = GatewayLink(
            gateway,
            client_id or os.environ.get(ENV_CLIENT_ID) or default_client_id(),
            interface=interface,
            timeout_s=timeout_s,
            discover_timeout_s=discover_timeout_s,
            qos=qos,
        )
        self._blobs = BlobCache()
        self._offload = Offloader(self.stats, self._link, timeout_s, retries)
        self._closed = False

    @property
    def client_id(self) -> str:
        """This device's id: it owns the device's tasks and names its reply topics (once
        connected to a gateway it is paired with, the paired id)."""
        return self._link.client_id

    @property
    def gateway_id(self) -> str | None:
        """The id of the gateway connected to (None before connecting): what lives on one
        gateway (tasks, notifications, runs) is reported with it."""
        conn = self._link.current
        return conn.gateway_id if conn is not None else None

    @property
    def gateway_found(self) -> str:
        """How the gateway was found (its stored address, named, mDNS) and how long it took."""
        return self._link.found

    @property
    def upload_progress(self) -> UploadProgress | None:
        """Called as an upload's chunks reach the broker: ``(sha256, bytes_acked, size)``, from
        the MQTT network thread (so: quick, and no calls back into the client). None: off."""
        return self._offload.uploads.progress

    @upload_progress.setter
    def upload_progress(self, progress: UploadProgress | None) -> None:
        self._offload.uploads.progress = progress

    def receiving(self) -> tuple[int, int] | None:
        """(bytes received, size) of the reply arriving from the gateway now, or None: what a
        download progress bar shows (``hearth._progress.DownloadBar``)."""
        conn = self._link.current
        return conn.receiving() if conn is not None else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._link.close()

    def connection(self) -> Connection:
        """The live connection, connecting (or reconnecting) if needed. Raises
        GatewayUnavailable, quickly when a recent attempt failed."""
        return self._link.connection()

    @property
    def pairing_needed(self) -> NotPaired | None:
        """Set when the gateway found serves paired devices only and this device must pair
        (again) first: its text says how."""
        return self._link.pairing_needed

    def gateway_reachable(self) -> bool:
        return self._link.reachable()

    def ping(self) -> float:
        """One round trip to the gateway, in ms."""
        return self.connection().ping_ms(self.timeout_s)

    def _wire_app(self) -> str | msgspec.UnsetType:
        """``app`` as job messages carry it: left out when not set (the device's id)."""
        return self.app or msgspec.UNSET

    def usage(self) -> list[AppUsage]:
        """This device's usage of the gateway today (UTC), by application (docs/quotas.md)."""
        reply = self.connection().request(Usage(), uuid.uuid4().bytes, self.timeout_s)
        if isinstance(reply, Error):
            raise JobError(reply.code, reply.message)
        if not isinstance(reply, UsageResult):
            raise JobError(ErrorCode.MALFORMED, f"unexpected reply {type(reply).__name__}")
        return list(reply.usage)

    def _off_lan(self, private: bool, mode: Placement) -> str | None:
        """Why this call must not be offloaded for its data class, or None."""
        return self._link.off_lan(private, mode)

    def _blob(self, source: bytes | str | Path) -> Blob:
        return self._blobs.get(source)

    def _submit(
        self, conn: Connection, job: Job, blob: Blob, correlation: bytes | None = None
    ) -> Reply:
        """Send ``job`` (uploading ``blob`` if asked) and wait for its final reply; sent again
        if the gateway goes away and comes back before the call's deadline."""
        return self._offload.submit(conn, job, blob, correlation).outcome.result()
