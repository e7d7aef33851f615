"""A Mosquitto of our own on a free loopback port, configured by the gateway's own
``mosquitto_config()`` (so it has ``set_tcp_nodelay true`` like the managed one)."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from hearth.transport import BrokerAddress
from hearth_gateway.broker import find_mosquitto, mosquitto_config
from hearth_gateway.policy import LimitsPolicy
from testkit.net import LOOPBACK, free_port, listening
from testkit.procs import child_pids, spawn, stop, tail

__all__ = ["Mosquitto"]

log = logging.getLogger("testkit")

_AS_ROOT = "Mosquitto should not be run as root/administrator."
_PORT_ATTEMPTS = 3  # a free port can be taken between probing it and mosquitto binding it


class Mosquitto:
    """A broker with its config, persistence and log under ``work_dir``/mosquitto. A context
    manager; ``close()`` is idempotent."""

    def __init__(self, work_dir: Path, *, max_packet_bytes: int | None = None) -> None:
        self._dir = work_dir / "mosquitto"
        self._max_packet_bytes = max_packet_bytes or LimitsPolicy().max_message_bytes + 64 * 1024
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self._dir / "mosquitto.log"
        self.address = BrokerAddress(LOOPBACK, 0)

    @property
    def port(self) -> int:
        return self.address.port

    @property
    def pid(self) -> int:
        """Mosquitto's own pid (its watcher's child: see hearth_gateway._pdeathsig)."""
        assert self._proc is not None, "not started"
        children = child_pids(self._proc.pid)
        return children[0] if children else self._proc.pid

    @property
    def url(self) -> str:
        return f"mqtt://{self.address}"

    def start(self, timeout_s: float = 10.0) -> Self:
        binary = find_mosquitto()
        self._dir.mkdir(parents=True, exist_ok=True)
        conf = self._dir / "mosquitto.conf"
        # Started as root, mosquitto would drop to its own user, to whom the 0700 directories
        # that pytest and tempfile make are closed; a loopback broker for a test run keeps root.
        keep_root = os.geteuid() == 0
        for _ in range(_PORT_ATTEMPTS):
            self.address = BrokerAddress(LOOPBACK, free_port())
            conf.write_text(
                mosquitto_config(
                    self.address, self._dir, self._max_packet_bytes, keep_root=keep_root
                )
            )
            self._proc = spawn([binary, "-c", str(conf)], self.log_path, supervised=True)
            if self._wait_listening(timeout_s):
                log.info("mosquitto pid %d on %s", self._proc.pid, self.address)
                return self
            stop(self._proc, 2.0)
            self._proc = None
        raise RuntimeError(f"mosquitto did not start; its log:\n{tail(self.log_path)}")

    def _wait_listening(self, timeout_s: float) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # e.g. the port was taken meanwhile
            if not listening(self.address.port):
                time.sleep(0.05)
                continue
            # Someone else may hold the port (it was free a moment ago); then mosquitto has
            # exited or is about to.
            time.sleep(0.1)
            return self._proc.poll() is None
        return False

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        rc = stop(proc, 5.0)
        for line in tail(self.log_path).splitlines():
            if not line.endswith(_AS_ROOT):  # we know: see start()
                log.warning("mosquitto: %s", line)  # it only logs warnings and errors
        if rc != 0:
            log.warning("mosquitto exited with status %d", rc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()
