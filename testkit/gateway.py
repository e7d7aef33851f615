"""A real ``hearth-gateway run`` daemon in a subprocess, against a broker of ours or with its
own managed Mosquitto."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from hearth.client import Client
from hearth.transport import BrokerAddress
from hearth_gateway.status import StatusSnapshot, read_snapshot
from testkit.procs import parent_pid, spawn, stop, tail
from testkit.wait import wait_until

__all__ = ["GatewayProcess"]

log = logging.getLogger("testkit")

_FAILURE_LINES = 50  # of its log, in the error when it does not come up


class GatewayProcess:
    """``hearth-gateway run`` with its state in ``work_dir``/state and its log (appended to
    across restarts) in ``work_dir``/gateway.log.

    Devices reach it at ``listen``: with ``managed`` that is the address of the Mosquitto the
    daemon starts itself (``--listen``), else that of an existing broker (``--broker``). mDNS is
    off unless ``extra_args`` name an ``--mdns-interface``. ``supervised``: under the
    ``_pdeathsig`` wrapper, so it goes if we are SIGKILLed (the benchmarks); the tests start the
    daemon directly because they SIGKILL, signal and inspect that very process (``proc``).

    ``start()`` returns once the daemon says it is online (its status snapshot, written when
    its link, workers and tasks are up). ``close()`` is idempotent: SIGTERM (it drains), a
    grace period, then SIGKILL to its whole process group; its warnings and errors are repeated
    on the ``testkit`` logger.
    """

    def __init__(
        self,
        listen: BrokerAddress,
        work_dir: Path,
        *,
        gateway_id: str | None = None,
        managed: bool = False,
        workers: int | None = None,
        extra_args: Sequence[str] = (),
        supervised: bool = True,
        python: str | None = None,
    ) -> None:
        self.listen = listen
        self.gateway_id = gateway_id or f"gw-{uuid.uuid4().hex[:8]}"
        self.state_dir = work_dir / "state"
        self.log_path = work_dir / "gateway.log"
        self.managed = managed
        self.extra = list(extra_args)
        self._workers = workers
        self._supervised = supervised
        self._python = python or sys.executable  # another virtualenv's (an accelerated build)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """Where devices connect, as ``Client(gateway=...)`` takes it."""
        return str(self.listen)

    @property
    def pid(self) -> int | None:
        """The pid of the process we started (when ``supervised``, the wrapper; the daemon is
        its child, see ``daemon_pid``), or None when not running."""
        return self.proc.pid if self.proc is not None else None

    def _argv(self) -> list[str]:
        argv = [self._python, "-m", "hearth_gateway.cli", "run"]
        argv += ["--gateway-id", self.gateway_id, "--state-dir", str(self.state_dir)]
        if self._workers is not None:
            argv += ["--workers", str(self._workers)]
        if self.managed:
            argv += ["--listen", str(self.listen)]
        else:
            argv += ["--broker", f"mqtt://{self.listen}"]
        argv += self.extra  # after ours: a repeated option's last value wins
        if "--mdns-interface" not in self.extra:
            argv.append("--no-mdns")
        return argv

    def start(self, timeout_s: float = 60.0) -> Self:
        """Start the daemon (again, after ``stop`` or ``kill``: same state directory) and wait
        until it is online; if it is not, stop it and raise."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.proc = spawn(self._argv(), self.log_path, supervised=self._supervised)
        proc = self.proc
        try:
            if not wait_until(lambda: self._online(proc), timeout_s, step_s=0.05):
                raise TimeoutError(f"gateway not online within {timeout_s} s:\n{self._tail()}")
        except BaseException:
            self.close(grace_s=5.0)
            raise
        log.info(
            "gateway %s (pid %d) online after %.1f s",
            self.gateway_id,
            proc.pid,
            time.monotonic() - started,
        )
        return self

    def _online(self, proc: subprocess.Popen[bytes]) -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited {proc.returncode}:\n{self._tail()}")
        snap = read_snapshot(self.state_dir)
        # The pid tells this start's snapshot from one a previous run left online.
        return snap is not None and snap.state == "online" and self._ours(snap.pid, proc)

    def _ours(self, pid: int, proc: subprocess.Popen[bytes]) -> bool:
        return pid == proc.pid or (self._supervised and parent_pid(pid) == proc.pid)

    def daemon_pid(self) -> int:
        """The daemon's own pid (from its status snapshot)."""
        snap = self.snapshot()
        if self.proc is None or not self._ours(snap.pid, self.proc):
            raise RuntimeError(f"gateway {self.gateway_id} is not running")
        return snap.pid

    def snapshot(self) -> StatusSnapshot:
        """Its status snapshot (what ``hearth-gateway status`` reads)."""
        snap = read_snapshot(self.state_dir)
        if snap is None:
            raise RuntimeError(f"gateway {self.gateway_id} has written no status snapshot")
        return snap

    def log(self) -> str:
        """Its whole log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _tail(self) -> str:
        return tail(self.log_path, _FAILURE_LINES)

    def client(self, **kwargs: Any) -> Client:
        """An SDK client for this gateway: edge placement, 20 s timeout unless given."""
        kwargs.setdefault("placement", "edge")
        kwargs.setdefault("timeout_s", 20.0)
        return Client(self.address, **kwargs)

    def kill(self) -> None:
        """SIGKILL the daemon alone (no goodbye, only its Last Will) and reap it; what it
        started is left to notice on its own, as after a crash."""
        if self.proc is None:
            raise RuntimeError(f"gateway {self.gateway_id} was never started")
        if self.proc.poll() is None:
            if self._supervised:  # the wrapper would turn a SIGKILL into the daemon's SIGTERM
                os.kill(self.daemon_pid(), signal.SIGKILL)
            else:
                self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (it drains its jobs and publishes offline) and its exit status."""
        if self.proc is None:
            raise RuntimeError(f"gateway {self.gateway_id} was never started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def close(self, grace_s: float = 30.0) -> None:
        """Stop it (SIGTERM, ``grace_s``, SIGKILL; 0: SIGKILL at once) and everything it
        started; repeat its warnings and errors. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        rc = stop(proc, grace_s)
        notable = [
            line
            for line in tail(self.log_path, 10_000).splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]
        for line in notable[-20:]:
            log.warning("gateway %s: %s", self.gateway_id, line)
        if rc not in (0, -signal.SIGKILL):
            log.warning("gateway %s exited with status %d", self.gateway_id, rc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()
