"""The managed Mosquitto: the gateway writes its configuration under the state directory,
starts it, restarts it if it dies, and stops it on exit. Use an external MQTT 5 broker instead
(``broker = "mqtt://host:port"``) when one box is not enough."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from hearth.transport import BrokerAddress
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


def mosquitto_config(listen: BrokerAddress, data_dir: Path, max_packet_bytes: int) -> str:
    # Anonymous access on the listener the gateway was told to open. With the default
    # loopback-only listener that is the local host only.
    return "\n".join(
        [
            "# Written by hearth-gateway on every start; edits are lost.",
            "per_listener_settings false",
            "allow_anonymous true",
            f"listener {listen.port} {listen.host}",
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
            "",
        ]
    )


class ManagedBroker:
    def __init__(self, state_dir: Path, listen: BrokerAddress, max_packet_bytes: int) -> None:
        self.address = listen
        self._dir = state_dir / "mosquitto"
        self._max_packet_bytes = max_packet_bytes
        self._proc: subprocess.Popen[bytes] | None = None
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._restarts: list[float] = []
        self.failed = threading.Event()  # set when it keeps dying: the daemon then exits

    def start(self, timeout_s: float = 10.0) -> None:
        binary = find_mosquitto()
        self._dir.mkdir(parents=True, exist_ok=True)
        conf = self._dir / "mosquitto.conf"
        conf.write_text(mosquitto_config(self.address, self._dir, self._max_packet_bytes))
        if os.geteuid() == 0:
            self._give_data_dir_to_mosquitto_user()
        self._check_port_free()
        self._spawn(binary, conf)
        self._wait_listening(timeout_s)
        self._supervisor = threading.Thread(
            target=self._supervise, args=(binary, conf), name="hearth-broker", daemon=True
        )
        self._supervisor.start()

    def _check_port_free(self) -> None:
        # Otherwise the readiness probe below would happily talk to whoever holds the port.
        family = socket.AF_INET6 if ":" in self.address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.address.host, self.address.port))
            except OSError as exc:
                raise BrokerError(
                    f"cannot listen on {self.address}: {exc.strerror}; is another broker "
                    "(Debian's mosquitto service?) running there? Use --listen HOST:PORT"
                ) from None

    def _give_data_dir_to_mosquitto_user(self) -> None:
        # Started as root, mosquitto drops to its own user and must still write persistence:
        # its directory becomes its own, and the state dir traversable (0711: no listing; the
        # daemon's umask keeps every file in it private).
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            return
        os.chown(self._dir, user.pw_uid, user.pw_gid)
        os.chmod(self._dir.parent, 0o711)  # noqa: S103 - traverse only, see above

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
