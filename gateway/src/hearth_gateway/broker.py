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

Memory per client is bounded: a client that does not read (a device asleep mid-job, a stuck
consumer) holds at most ``max_inflight_bytes`` in flight and ``max_queued_bytes`` queued of
QoS 1 and 2 messages (and ``max_queued_messages``); Mosquitto drops what is beyond and counts it
in ``$SYS/broker/publish/messages/dropped``, which the daemon reads (``BrokerEvents``) into its
status. Mosquitto 2.0 does not bound QoS 0 messages to a connected client: the SDK asks at
QoS 1, and replies go at the request's QoS.

With a pairing listener, Mosquitto logs its notices to stderr and to
``$SYS/broker/log/<severity>`` as well: the daemon reads the connection notices there for the
source address of each connection (``BrokerEvents.address_of``), which pairing audits (its
requests arrive as MQTT messages, without an address).

Its lifetime: Mosquitto runs under a small watcher (``_pdeathsig``), and neither outlives the
daemon, whichever of the three is killed. The kernel does most of it (parent-death signals: see
_pdeathsig.py for why the watcher, not Mosquitto, changes user). Behind that, the daemon holds
the broker itself through the pid file the watcher writes (``mosquitto/mosquitto.pid``): when
the watcher dies it ends what is left before starting a new one, and at start it ends a broker
that a killed predecessor left behind, one whose command line names this state directory's
``mosquitto.conf``, never one found by name. A PID namespace or a subreaper would not do
better: see _pdeathsig.py.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from hearth.transport import BrokerAddress
from hearth_gateway._process import ProcessHandle
from hearth_gateway.acl import (
    GATEWAY_USER,
    BrokerSecurity,
    lan_acl,
    local_acl,
    pairing_acl,
    password_line,
)
from hearth_gateway.errors import BrokerError

__all__ = ["BrokerEvents", "ManagedBroker", "find_mosquitto", "mosquitto_config"]

log = logging.getLogger(__name__)

_MAX_RESTARTS = 5  # within _RESTART_WINDOW_S; past that the daemon gives up (systemd restarts it)
_RESTART_WINDOW_S = 60.0
_STOP_S = 7.0  # the watcher SIGKILLs a broker still running 5 s after SIGTERM (_pdeathsig)
# Per client (see the module's docstring). A single larger message still goes through alone.
INFLIGHT_BYTES = 8 * 1024 * 1024
QUEUED_BYTES = 16 * 1024 * 1024
QUEUED_MESSAGES = 10000  # small requests queued for the daemon while it restarts
SYS_INTERVAL_S = 5  # how often Mosquitto publishes its $SYS counters


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
    timestamps: bool = True,
) -> str:
    """The broker's configuration. Without ``security`` (tests' stand-alone broker): one
    anonymous listener, no ACL. ``keep_root``: started as root, do not drop privileges.
    ``timestamps``: False under the journal, which has its own."""
    common = [
        *(["user root"] if keep_root else []),
        # Small QoS 1 round trips stall ~40-90 ms on Nagle + delayed ACK without this.
        "set_tcp_nodelay true",
        f"max_packet_size {max_packet_bytes}",
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_interval 30",
        f"max_inflight_bytes {INFLIGHT_BYTES}",
        f"max_queued_messages {QUEUED_MESSAGES}",
        f"max_queued_bytes {QUEUED_BYTES}",
        f"sys_interval {SYS_INTERVAL_S}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        f"log_timestamp {'true' if timestamps else 'false'}",
    ]
    if security is not None and security.pairing is not None:
        # Connection notices, for pairing's audit (BrokerEvents): on stderr too, since
        # Mosquitto 2.0 has one log_type for every destination.
        common += ["log_dest topic", "log_type notice", "connection_messages true"]
    head = "# Written by hearth-gateway on every start; edits are lost."
    if security is None:
        return "\n".join(
            [
                head,
                "per_listener_settings false",
                "allow_anonymous true",
                f"listener {listen.port} {listen.host}",
                *common,
                "",
            ]
        )
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


LOG_NOTICES = "$SYS/broker/log/N"
DROPPED = "$SYS/broker/publish/messages/dropped"
_CONNECTED = re.compile(r"New client connected from (\S+):(\d+) as (\S+) ")
_PEERS_KEPT = 1024  # connections whose address is remembered, the newest


class BrokerEvents:
    """What the daemon learns from the managed broker's $SYS topics (it subscribes to
    ``LOG_NOTICES`` and ``DROPPED``): each client's source address, and the messages dropped
    for clients that do not read."""

    filters = (LOG_NOTICES, DROPPED)

    def __init__(self) -> None:
        self._peers: dict[str, str] = {}  # client id -> "address:port", oldest first
        self.dropped = 0  # since the broker (re)started

    @staticmethod
    def owns(topic: str) -> bool:
        return topic.startswith("$SYS/")

    def on_message(self, topic: str, payload: bytes) -> None:
        text = payload.decode(errors="replace")
        if topic == DROPPED:
            if text.strip().isdigit():
                self.dropped = int(text)
            return
        if topic == LOG_NOTICES and (match := _CONNECTED.search(text)):
            address, port, client_id = match.groups()
            self._peers.pop(client_id, None)
            self._peers[client_id] = f"{address}:{port}"
            if len(self._peers) > _PEERS_KEPT:
                del self._peers[next(iter(self._peers))]

    def address_of(self, client_id: str) -> str | None:
        """Where ``client_id``'s latest connection came from, if the broker said."""
        return self._peers.get(client_id)


def _traversable(directory: Path, user: pwd.struct_passwd) -> bool:
    st = directory.stat()
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == user.pw_gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _describe_exit(rc: int, pid: int | None) -> str:
    """What the watcher's exit status ``rc`` says happened (_pdeathsig.main's convention)."""
    if rc < 0:
        name = _signal_name(-rc)
        return f"mosquitto's watcher was killed by {name}; mosquitto (pid {pid}) ends with it"
    if rc > 128:
        return f"mosquitto (pid {pid}) was killed by {_signal_name(rc - 128)}"
    return f"mosquitto (pid {pid}) exited with status {rc}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class ManagedBroker:
    def __init__(
        self,
        state_dir: Path,
        listen: BrokerAddress,
        max_packet_bytes: int,
        security: BrokerSecurity | None = None,
        *,
        timestamps: bool = True,
    ) -> None:
        self.address = listen
        self._timestamps = timestamps
        self._dir = state_dir / "mosquitto"
        self._conf = self._dir / "mosquitto.conf"
        self._pid_file = self._dir / "mosquitto.pid"  # written by the watcher's child
        self._max_packet_bytes = max_packet_bytes
        self._security = security
        self._owner: tuple[int, int] | None = None  # mosquitto's uid, gid when started as root
        self._run_as: str | None = None  # the user the watcher runs mosquitto as (root only)
        self._lock = threading.Lock()  # the three below and _closing, against other threads
        self._proc: subprocess.Popen[bytes] | None = None  # the watcher, reaped by _supervise
        self._watcher: ProcessHandle | None = None  # the same, for signals
        self._broker: ProcessHandle | None = None  # mosquitto itself
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._restarts: list[float] = []
        self.failed = threading.Event()  # set when it keeps dying: the daemon then exits

    def start(self, timeout_s: float = 10.0) -> None:
        binary = find_mosquitto()
        self._dir.mkdir(parents=True, exist_ok=True)
        keep_root = os.geteuid() == 0 and not self._give_data_dir_to_mosquitto_user()
        # Through _install: mosquitto re-reads it on SIGHUP, as its own user.
        config = mosquitto_config(
            self.address,
            self._dir,
            self._max_packet_bytes,
            self._security,
            keep_root=keep_root,
            timestamps=self._timestamps,
        )
        self._install(self._conf.name, config.encode())
        if self._security is not None:
            self._write_security(self._security)
        self._end_stale()
        for address in self._listeners():
            self._check_port_free(address)
        self._run_as = self._mosquitto_user()
        with self._lock:
            self._spawn(binary)
        self._wait_listening(timeout_s)
        self._adopt()
        self._supervisor = threading.Thread(
            target=self._supervise, args=(binary,), name="hearth-broker", daemon=True
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

    # -- lifetime -----------------------------------------------------------------------------

    @property
    def _broker_args(self) -> list[str]:
        """Mosquitto's arguments: what makes a process the broker of this state directory."""
        return ["-c", str(self._conf)]

    def _end_stale(self) -> None:
        """A broker of this state directory that outlived its daemon and its watcher (killed
        together while mosquitto had dropped its privileges itself, see _mosquitto_user; or one
        that ignored its SIGTERM) still holds our ports and serves the ACLs of its day: it goes
        before ours starts."""
        stale = ProcessHandle.from_pid_file(self._pid_file, self._broker_args)
        if stale is None:
            return
        log.warning(
            "ending a stale mosquitto (pid %d) of %s left behind by an earlier run",
            stale.pid,
            self._dir,
        )
        stale.end()
        stale.close()

    def _mosquitto_user(self) -> str | None:
        """Whom the watcher runs mosquitto as: None for as we are (not root, or root keeping
        its rights), else mosquitto's own user, so that mosquitto has no privileges to drop and
        keeps its parent-death signal (_pdeathsig.py) - unless a listener needs root to bind:
        then mosquitto drops them itself, after binding, and only the daemon's own watch (the
        pid file) stands behind it."""
        if self._owner is None:
            return None
        low = min(a.port for a in self._listeners())
        if low < _unprivileged_port_start():
            log.info(
                "port %d needs root to bind: mosquitto drops its privileges itself, so it "
                "does not die with its watcher; the daemon ends it",
                low,
            )
            return None
        return pwd.getpwuid(self._owner[0]).pw_name

    def _spawn(self, binary: str) -> None:
        """Start a watcher and its mosquitto; the caller holds ``_lock``."""
        # Called from the main thread at start and from the supervisor on restarts: the
        # watcher's parent-death signal follows the thread that forked it, and both threads
        # live as long as the broker should.
        self._pid_file.unlink(missing_ok=True)  # _adopt must read this broker's pid, no other
        argv = [
            sys.executable,
            "-m",
            "hearth_gateway._pdeathsig",
            "--pid-file",
            str(self._pid_file),
        ]
        if self._run_as is not None:
            argv += ["--user", self._run_as]
        proc = subprocess.Popen(
            [*argv, binary, *self._broker_args],
            stdin=subprocess.DEVNULL,
            close_fds=True,
            # Its own session: a Ctrl-C or `timeout` aimed at the daemon's process group must
            # not stop the broker while jobs are still draining; the daemon stops it last.
            start_new_session=True,
        )
        # Not reaped before _supervise waits for it: the pid cannot name anyone else yet.
        self._proc, self._watcher = proc, ProcessHandle.open(proc.pid)

    def _adopt(self) -> None:
        """Take hold of the mosquitto that now listens, through the pid file its watcher
        wrote before exec."""
        broker = ProcessHandle.from_pid_file(self._pid_file, self._broker_args)
        with self._lock:
            self._broker = broker
        proc = self._proc
        assert proc is not None
        if broker is None:
            log.warning(
                "mosquitto listens on %s but %s names no broker of this state directory",
                self.address,
                self._pid_file,
            )
            return
        log.info(
            "managed mosquitto pid %d (watcher pid %d) on %s", broker.pid, proc.pid, self.address
        )

    def _end_broker(self, timeout_s: float = 5.0) -> None:
        """Whatever is left of the broker we started: nothing, normally, since it dies with
        its watcher; but mosquitto may have had to drop its privileges itself. The pid file
        names one that was never adopted (it did not listen in time)."""
        with self._lock:
            broker, self._broker = self._broker, None
        if broker is None:
            broker = ProcessHandle.from_pid_file(self._pid_file, self._broker_args)
        if broker is None:
            return
        if not broker.end(timeout_s):
            log.error("mosquitto (pid %d) still runs after SIGKILL", broker.pid)
        broker.close()

    def _wait_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        host = "127.0.0.1" if self.address.host in ("0.0.0.0", "") else self.address.host
        host = "::1" if host == "::" else host
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(_describe_exit(self._proc.returncode, None))
            try:
                with socket.create_connection((host, self.address.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise BrokerError(f"mosquitto did not listen on {self.address} within {timeout_s} s")

    def _supervise(self, binary: str) -> None:
        try:
            self._keep_running(binary)
        except Exception:
            # Not silently: the daemon stops when it sees `failed`, and systemd restarts it.
            log.exception("the managed broker's supervisor failed")
            self.failed.set()

    def _keep_running(self, binary: str) -> None:
        while True:
            proc = self._proc
            assert proc is not None
            rc = proc.wait()
            if self._closing.is_set():
                return
            broker = self._broker
            log.warning("%s; restarting it", _describe_exit(rc, broker.pid if broker else None))
            # Before a new one starts: an old one still on the port would make it exit at once.
            self._end_broker()
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW_S]
            if len(self._restarts) >= _MAX_RESTARTS:
                log.error(
                    "mosquitto died %d times in %.0f s; giving up", _MAX_RESTARTS, _RESTART_WINDOW_S
                )
                self.failed.set()
                return
            self._restarts.append(now)
            time.sleep(0.2 * len(self._restarts))
            with self._lock:  # close() sets _closing under it: no spawn after close began
                if self._closing.is_set():
                    return
                self._spawn(binary)
            try:
                self._wait_listening(10.0)
                self._adopt()
            except BrokerError:
                if self._closing.is_set():
                    return
                log.exception("restarting mosquitto failed")

    @property
    def pid(self) -> int | None:
        """Mosquitto's own pid (not its watcher's); None while it is being restarted."""
        broker = self._broker
        return broker.pid if broker is not None else None

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
        self._install(
            "acl-lan", lan_acl(security.gateway_id, security.devices, security.grants).encode()
        )
        self._install("acl-pairing", pairing_acl().encode())
        sources = {
            "ca.pem": security.ca_file,
            "server.pem": security.cert_file,
            "server.key": security.key_file,
            "crl.pem": security.crl_file,
        }
        for name, source in sources.items():
            if source is None:
                raise BrokerError(f"TLS listener configured without its {name}")
            self._install(name, source.read_bytes())

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
            log.warning(
                "mosquitto's own user cannot reach %s (%s is closed to it): the broker "
                "keeps root's privileges",
                self._dir,
                closed,
            )
            return False
        self._owner = (user.pw_uid, user.pw_gid)
        os.chown(self._dir, user.pw_uid, user.pw_gid)
        return True

    def update_security(self, security: BrokerSecurity) -> None:
        """New ACLs and CRL (a device paired or was revoked), in force as soon as the broker
        has handled its SIGHUP: Mosquitto re-reads them and applies the ACLs to the clients
        already connected (messages to a revoked device stop; its publishes get 0x87). A
        broker being restarted reads them at its start or gets the SIGHUP: its watcher exists
        before it reads its configuration, and a SIGHUP before mosquitto handles signals ends
        it, and its replacement reads them."""
        self._security = security
        self._write_security(security)
        with self._lock:
            if self._watcher is not None:
                self._watcher.signal(signal.SIGHUP)  # passed on to mosquitto

    def close(self) -> None:
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            proc, watcher = self._proc, self._watcher
        if proc is not None and watcher is not None and watcher.signal(signal.SIGTERM):
            try:
                proc.wait(timeout=_STOP_S)
            except subprocess.TimeoutExpired:
                watcher.signal(signal.SIGKILL)
                proc.wait()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        self._end_broker(timeout_s=2.0)  # one that outlived its watcher
        if watcher is not None:
            watcher.close()
        self._pid_file.unlink(missing_ok=True)
