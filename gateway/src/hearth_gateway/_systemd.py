"""Talk to systemd without depending on libsystemd or python-systemd.

The gateway runs as a ``Type=notify`` service with a watchdog (see
``systemd/hearth-gateway.service``). The whole protocol is a few environment
variables and one datagram per message, so a dependency (and a C extension on
every edge board) would cost more than these ~100 lines.

Everything here is a no-op outside systemd: :func:`notify` returns ``False``
and the other helpers return ``None``, so the daemon calls them unconditionally.

Example, in the main process::

    notify("READY=1", "STATUS=serving on 127.0.0.1:1883")
    interval_s = watchdog_interval_s()
    ...  # every interval_s seconds while healthy:
    notify("WATCHDOG=1")
    ...  # on SIGTERM, before draining jobs:
    notify("STOPPING=1")
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

__all__ = ["credentials_dir", "notify", "watchdog_interval_s"]

logger = logging.getLogger(__name__)

_USEC_PER_S = 1_000_000


def _socket_address(raw: str) -> str | None:
    """Map ``$NOTIFY_SOCKET`` to an ``AF_UNIX`` address, or ``None`` if unusable.

    systemd writes a leading ``@`` for an abstract-namespace socket, whose real
    name starts with a NUL byte. Other schemes (``vsock:``, used for VMs) are
    not ones the gateway runs under, so they count as "not under systemd".
    """
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


def notify(*states: str) -> bool:
    """Send ``KEY=VALUE`` state lines (``READY=1``, ``WATCHDOG=1``, ``STATUS=...``) to systemd.

    All states go in one datagram, so systemd applies them together (e.g.
    ``READY=1`` with the first ``STATUS=``). Returns ``True`` when the datagram
    was sent, ``False`` when not running under systemd or when sending failed;
    a failure is logged, not raised, because losing a status update must not
    take the daemon down (a lost ``WATCHDOG=1`` is systemd's to act on).

    Call it from the main process only: the unit sets ``NotifyAccess=main``, so
    systemd ignores (and logs) messages from workers.

    Raises:
        ValueError: a state is not ``KEY=VALUE`` or contains a newline, which
            would let e.g. a peer-supplied ``STATUS`` text inject other keys.
    """
    for state in states:
        if "\n" in state or "=" not in state or state.startswith("="):
            raise ValueError(f"not a single KEY=VALUE sd_notify state: {state!r}")
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if not raw or not states:
        return False
    address = _socket_address(raw)
    if address is None:
        logger.debug("ignoring unsupported NOTIFY_SOCKET %r", raw)
        return False
    payload = "\n".join(states).encode()
    try:
        # Python sockets are close-on-exec already, so none leaks into the
        # Mosquitto child or the workers. One socket per call: READY and
        # WATCHDOG are rare enough that keeping one open buys nothing.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sent = sock.sendto(payload, address)
    except OSError as exc:
        logger.warning("sd_notify to %r failed: %s", raw, exc)
        return False
    return sent == len(payload)


def watchdog_interval_s() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or ``None`` if no watchdog is armed for us.

    systemd sets ``$WATCHDOG_USEC`` to the full ``WatchdogSec=`` timeout; this
    returns half of it, the period sd_watchdog_enabled(3) recommends so that
    one late ping does not get the service killed. ``$WATCHDOG_PID``, when
    set, names the process the watchdog is for; a worker that inherited the
    environment gets ``None`` and must not ping. Malformed values also give
    ``None`` (and a warning), as libsystemd treats them as "not enabled".
    """
    raw_usec = os.environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = os.environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            logger.warning("ignoring malformed WATCHDOG_PID %r", raw_pid)
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        logger.warning("ignoring malformed WATCHDOG_USEC %r", raw_usec)
        return None
    if usec <= 0:
        logger.warning("ignoring non-positive WATCHDOG_USEC %r", raw_usec)
        return None
    return usec / _USEC_PER_S / 2


def credentials_dir() -> Path | None:
    """Directory of ``LoadCredential=``/``SetCredential=`` secrets, or ``None``.

    Secrets (TLS keys, broker passwords) passed this way live on a
    non-swappable, service-private mount readable only by the service user,
    instead of in the config file or the environment, where they would be
    visible to ``systemctl show`` and inherited by every child process.
    """
    raw = os.environ.get("CREDENTIALS_DIRECTORY")
    if not raw:
        return None
    path = Path(raw)
    if not path.is_absolute():
        logger.warning("ignoring relative CREDENTIALS_DIRECTORY %r", raw)
        return None
    return path
