"""The managed Mosquitto: the gateway writes its configuration under the state directory,
starts it, restarts it if it dies, and stops it on exit. Use an external MQTT 5 broker instead
(``broker = "mqtt://host:port"``) when one box is not enough.

Its listeners (docs/security.md), each with its own ACL file (``per_listener_settings``):

* ``listen`` (loopback): local processes, anonymous. They may submit as, and read the replies
  of, any device id that was never paired; the gateway's own topics and every paired device's
  are out of their reach. The daemon itself logs in here with a password generated at each
  start, the only account with the gateway's rights.
* ``lan_listen`` (TLS, client certificate required, CN = username): paired devices, each
  limited to its own request topic, its own replies and the gateway's status.
* pairing (TLS, no client certificate): anonymous, each connection limited to the pairing
  topics named by its own client id.

The ACLs and the CRL are rewritten and the broker reloaded (SIGHUP) whenever a device pairs or
is revoked; connected clients are held to the new ACLs at once.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from hearth.transport import BrokerAddress
from hearth_gateway.acl import (
    GATEWAY_USER,
    BrokerSecurity,
    lan_acl,
    local_acl,
    pairing_acl,
    password_line,
)
from hearth_gateway.errors import BrokerError

__all__ = ["ManagedBroker", "find_mosquitto", "mosquitto_config"]

log = logging.getLogger(__name__)

_MAX_RESTARTS = 5  # within _RESTART_WINDOW_S; past that the daemon gives up (systemd restarts it)
_RESTART_WINDOW_S = 60.0


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )
    if path is None:
        raise BrokerError(
            "mosquitto not found: install it with `sudo apt-get install mosquitto`, "
            "or point the gateway at an external broker with --broker mqtt://HOST:PORT"
        )
    return path


def mosquitto_config(
    listen: BrokerAddress,
    data_dir: Path,
    max_packet_bytes: int,
    security: BrokerSecurity | None = None,
    *,
    keep_root: bool = False,
) -> str:
    """The broker's configuration. Without ``security`` (tests' stand-alone broker): one
    anonymous listener, no ACL. ``keep_root``: started as root, do not drop privileges."""
    common = [
        *(["user root"] if keep_root else []),
        # Small QoS 1 round trips stall ~40-90 ms on Nagle + delayed ACK without this.
        "set_tcp_nodelay true",
        f"max_packet_size {max_packet_bytes}",
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_interval 30",
        "max_queued_messages 10000",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    head = "# Written by hearth-gateway on every start; edits are lost."
    if security is None:
        return "\n".join([head, "per_listener_settings false", "allow_anonymous true",
                          f"listener {listen.port} {listen.host}", *common, ""])  # fmt: skip
    lines = [
        head,
        "per_listener_settings true",
        *common,
        "# Local processes; the daemon logs in with its password.",
        f"listener {listen.port} {listen.host}",
        "allow_anonymous true",
        f"password_file {data_dir / 'passwd'}",
        f"acl_file {data_dir / 'acl-local'}",
    ]
    tls = [
        f"cafile {data_dir / 'ca.pem'}",
        f"certfile {data_dir / 'server.pem'}",
        f"keyfile {data_dir / 'server.key'}",
        "tls_version tlsv1.2",  # the lowest accepted
    ]
    if security.lan is not None:
        lines += [
            "# Paired devices: mutual TLS, the certificate's CN is the username.",
            f"listener {security.lan.port} {security.lan.host}",
            *tls,
            f"crlfile {data_dir / 'crl.pem'}",
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
            f"acl_file {data_dir / 'acl-lan'}",
        ]
    if security.pairing is not None:
        lines += [
            "# Pairing only: TLS without a client certificate, anonymous, few connections.",
            f"listener {security.pairing.port} {security.pairing.host}",
            *tls,
            "require_certificate false",
            "allow_anonymous true",
            "max_connections 16",
            f"acl_file {data_dir / 'acl-pairing'}",
        ]
    return "\n".join([*lines, ""])


def _traversable(directory: Path, user: pwd.struct_passwd) -> bool:
    st = directory.stat()
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == user.pw_gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


class ManagedBroker:
    def __init__(
        self,
        state_dir: Path,
        listen: BrokerAddress,
        max_packet_bytes: int,
        security: BrokerSecurity | None = None,
    ) -> None:
        self.address = listen
        self._dir = state_dir / "mosquitto"
        self._max_packet_bytes = max_packet_bytes
        self._security = security
        self._owner: tuple[int, int] | None = None  # mosquitto's uid, gid when started as root
        self._proc: subprocess.Popen[bytes] | None = None
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._restarts: list[float] = []
        self.failed = threading.Event()  # set when it keeps dying: the daemon then exits

    def start(self, timeout_s: float = 10.0) -> None:
        binary = find_mosquitto()
        self._dir.mkdir(parents=True, exist_ok=True)
        conf = self._dir / "mosquitto.conf"
        keep_root = os.geteuid() == 0 and not self._give_data_dir_to_mosquitto_user()
        # Through _install: mosquitto re-reads it on SIGHUP, as its own user.
        self._install(conf.name, mosquitto_config(
            self.address, self._dir, self._max_packet_bytes, self._security, keep_root=keep_root
        ).encode())  # fmt: skip
        if self._security is not None:
            self._write_security(self._security)
        for address in self._listeners():
            self._check_port_free(address)
        self._spawn(binary, conf)
        self._wait_listening(timeout_s)
        self._supervisor = threading.Thread(
            target=self._supervise, args=(binary, conf), name="hearth-broker", daemon=True
        )
        self._supervisor.start()

    def _listeners(self) -> list[BrokerAddress]:
        security = self._security
        extra = [] if security is None else [security.lan, security.pairing]
        return [self.address, *(a for a in extra if a is not None)]

    @staticmethod
    def _check_port_free(address: BrokerAddress) -> None:
        # Otherwise the readiness probe below would happily talk to whoever holds the port.
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address.host, address.port))
            except OSError as exc:
                raise BrokerError(
                    f"cannot listen on {address}: {exc.strerror}; is another broker "
                    "(Debian's mosquitto service?) running there? Use --listen HOST:PORT"
                ) from None

    # -- security files ---------------------------------------------------------------------

    def _install(self, name: str, data: bytes) -> None:
        """Write a file the broker reads, atomically (it may be reloading right now), private
        to the broker's user."""
        path = self._dir / name
        tmp = self._dir / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if self._owner is not None:
            os.chown(tmp, *self._owner)
        os.replace(tmp, path)

    def _write_security(self, security: BrokerSecurity) -> None:
        self._install("passwd", password_line(GATEWAY_USER, security.password).encode())
        self._install("acl-local", local_acl(security.gateway_id, security.known).encode())
        if security.lan is None:
            return
        self._install("acl-lan", lan_acl(security.gateway_id, security.devices).encode())
        self._install("acl-pairing", pairing_acl().encode())
        sources = {"ca.pem": security.ca_file, "server.pem": security.cert_file,
                   "server.key": security.key_file, "crl.pem": security.crl_file}  # fmt: skip
        for name, source in sources.items():
            if source is None:
                raise BrokerError(f"TLS listener configured without its {name}")
            self._install(name, source.read_bytes())

    def update_security(self, security: BrokerSecurity) -> None:
        """New ACLs and CRL (a device paired or was revoked), in force as soon as the broker
        has handled its SIGHUP: Mosquitto re-reads them and applies the ACLs to the clients
        already connected (messages to a revoked device stop; its publishes get 0x87)."""
        self._security = security
        self._write_security(security)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGHUP)

    def _give_data_dir_to_mosquitto_user(self) -> bool:
        """Started as root, mosquitto drops to its own user and must still read its password,
        ACL and TLS files (again on every reload) and write persistence: its directory becomes
        its own, and the state dir traversable (0711: no listing; the daemon's umask keeps every
        file in it private). False when a directory above is closed to it (a 0700 temporary
        directory): then it has to keep root's rights, and says so."""
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            return True
        os.chmod(self._dir.parent, 0o711)  # noqa: S103 - traverse only, see above
        closed = next((d for d in self._dir.parents if not _traversable(d, user)), None)
        if closed is not None:
            log.warning("mosquitto's own user cannot reach %s (%s is closed to it): the broker "
                        "keeps root's privileges", self._dir, closed)  # fmt: skip
            return False
        self._owner = (user.pw_uid, user.pw_gid)
        os.chown(self._dir, user.pw_uid, user.pw_gid)
        return True

    def _spawn(self, binary: str, conf: Path) -> None:
        # The wrapper sets PR_SET_PDEATHSIG before exec: if the daemon is SIGKILLed, the broker
        # goes with it instead of lingering on the port.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hearth_gateway._pdeathsig", binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            close_fds=True,
            # Its own session: a Ctrl-C or `timeout` aimed at the daemon's process group must
            # not stop the broker while jobs are still draining; the daemon stops it last.
            start_new_session=True,
        )
        log.info("managed mosquitto pid %d on %s", self._proc.pid, self.address)

    def _wait_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        host = "127.0.0.1" if self.address.host in ("0.0.0.0", "") else self.address.host
        host = "::1" if host == "::" else host
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with status {self._proc.returncode}")
            try:
                with socket.create_connection((host, self.address.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise BrokerError(f"mosquitto did not listen on {self.address} within {timeout_s} s")

    def _supervise(self, binary: str, conf: Path) -> None:
        while not self._closing.is_set():
            proc = self._proc
            assert proc is not None
            rc = proc.wait()
            if self._closing.is_set():
                return
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW_S]
            if len(self._restarts) >= _MAX_RESTARTS:
                log.error(
                    "mosquitto died %d times in %.0f s; giving up", _MAX_RESTARTS, _RESTART_WINDOW_S
                )
                self.failed.set()
                return
            self._restarts.append(now)
            log.warning("mosquitto exited with status %s; restarting it", rc)
            time.sleep(0.2 * len(self._restarts))
            try:
                self._spawn(binary, conf)
                self._wait_listening(10.0)
            except BrokerError:
                log.exception("restarting mosquitto failed")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
