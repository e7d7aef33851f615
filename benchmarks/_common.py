"""Shared parts of the benchmark programs: real processes on loopback, figures out.

- ``Mosquitto``: a broker on a free 127.0.0.1 port, configured by the gateway's own
  ``mosquitto_config()`` (so it has ``set_tcp_nodelay true`` like the managed one).
- ``GatewayProcess``: ``hearth-gateway run`` as a subprocess against that broker, waited for
  until it answers a ping, stopped with SIGTERM (it drains) and reaped.
- ``EchoResponderProcess`` and ``EchoRequester``: the raw MQTT 5 request/response baseline. The
  responder is a process of its own (``python benchmarks/_common.py echo-responder ...``), as
  the gateway is, so the baseline does not share an interpreter (and its GIL) with the caller.
- ``tree_cpu_s``: CPU time used by a process tree (all of a benchmark's processes), for figures
  that do not depend on how busy the machine is.
- ``Summary``/``percentile``, ``print_table``, ``emit_json``, ``verdict``: the output.

The process helpers are context managers with an idempotent ``close()``. Each child is started
in a session of its own (Ctrl-C reaches only the benchmark, which then stops them in order:
SIGTERM, a grace period, then SIGKILL to the whole process group) and under
``hearth_gateway._pdeathsig``, so it goes too if the benchmark is SIGKILLed. Everything listens
on and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol, Self, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes

from hearth import Client
from hearth.errors import GatewayUnavailable
from hearth.transport import BrokerAddress, connect, make_client, properties, publish_properties
from hearth_gateway.broker import find_mosquitto, mosquitto_config
from hearth_gateway.policy import LimitsPolicy

__all__ = [
    "LOOPBACK",
    "REPO_ROOT",
    "EchoRequester",
    "EchoResponderProcess",
    "GatewayProcess",
    "Mosquitto",
    "Summary",
    "child_pids",
    "emit_json",
    "ensure_examples",
    "free_port",
    "percentile",
    "print_table",
    "proc_cmdline",
    "proc_memory_bytes",
    "setup_logging",
    "sigterm_as_interrupt",
    "subscribe_and_wait",
    "tree_cpu_s",
    "verdict",
]

log = logging.getLogger("bench")

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
WASM_EXAMPLES = REPO_ROOT / "build" / "examples" / "wasm"

_PORT_ATTEMPTS = 3  # a free port can be taken between probing it and mosquitto binding it
_TAIL_LINES = 20


class HasFigures(Protocol):
    @property
    def figures(self) -> dict[str, Any]: ...


OutcomeT = TypeVar("OutcomeT", bound=HasFigures)


def run_and_report(
    run: Callable[[Path], OutcomeT], as_json: bool, report: Callable[[OutcomeT], None]
) -> int:
    """The shared end of each benchmark's main(): run in a temp dir, Ctrl-C and SIGTERM stop
    everything cleanly, then one JSON object (``--json``) or the human report."""
    started = time.monotonic()
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="hearth-bench-") as tmp:
            outcome = run(Path(tmp))
    except KeyboardInterrupt:
        log.warning("interrupted; everything was stopped")
        return 130
    outcome.figures["wall_s"] = time.monotonic() - started
    if as_json:
        emit_json(outcome.figures)
    else:
        report(outcome)
        log.info("done in %.0f s", outcome.figures["wall_s"])
    return 0


def setup_logging(verbose: bool = False) -> None:
    """Logs go to stderr: stdout is for the figures (and only the JSON line with --json)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # the SDK's fallbacks and retries would drown the progress lines
        logging.getLogger("hearth").setLevel(logging.WARNING)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while inside, so ``finally``/``with`` cleanup runs."""

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def ensure_examples(*names: str) -> Path:
    """The directory of the example WASM modules, building them first if any of ``names``
    (e.g. "noop.wasm") is missing."""
    missing = [name for name in names if not (WASM_EXAMPLES / name).is_file()]
    if missing:
        log.info("building the examples (%s missing)", ", ".join(missing))
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "build_examples.py")],
            check=True,
            stdout=sys.stderr,  # keep stdout for the figures
            timeout=600,
        )
        still = [name for name in names if not (WASM_EXAMPLES / name).is_file()]
        if still:
            raise RuntimeError(f"scripts/build_examples.py did not produce {', '.join(still)}")
    return WASM_EXAMPLES


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM (the _pdeathsig wrapper passes it on), wait up to ``grace_s``, then SIGKILL the
    child's process group; afterwards nothing of that group is left. Returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d still running %.0f s after SIGTERM; killing it", proc.pid, grace_s)
            _kill_group(proc.pid)
    rc = proc.wait()
    # The group is the session started for this child: whatever it left behind (the program
    # under the wrapper, a gateway's workers) is ours to end.
    _kill_group(proc.pid)
    return rc


def _spawn(argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "hearth_gateway._pdeathsig", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,  # its own process group, id = its pid
        )


class Mosquitto:
    """A Mosquitto on a free loopback port, its config and persistence under ``work_dir``."""

    def __init__(self, work_dir: Path, *, max_packet_bytes: int | None = None) -> None:
        self._work_dir = work_dir
        self._dir = work_dir / "mosquitto"
        self._max_packet_bytes = max_packet_bytes or LimitsPolicy().max_message_bytes + 64 * 1024
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self._dir / "mosquitto.log"
        self.address = BrokerAddress(LOOPBACK, 0)

    def start(self, timeout_s: float = 10.0) -> Self:
        binary = find_mosquitto()
        self._dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._give_dir_to_mosquitto_user()
        conf = self._dir / "mosquitto.conf"
        for _ in range(_PORT_ATTEMPTS):
            self.address = BrokerAddress(LOOPBACK, free_port())
            conf.write_text(mosquitto_config(self.address, self._dir, self._max_packet_bytes))
            self._proc = _spawn([binary, "-c", str(conf)], self._log)
            if self._wait_listening(timeout_s):
                log.info("mosquitto pid %d on %s", self._proc.pid, self.address)
                return self
            _stop(self._proc, 2.0)
            self._proc = None
        raise RuntimeError(f"mosquitto did not start; its log:\n{_tail(self._log)}")

    def _give_dir_to_mosquitto_user(self) -> None:
        # Started as root, mosquitto drops to its own user (as in hearth_gateway.broker) and
        # must still reach its directory to save persistence on exit.
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            return
        os.chown(self._dir, user.pw_uid, user.pw_gid)
        mode = self._work_dir.stat().st_mode
        if not mode & 0o001:
            os.chmod(self._work_dir, mode | 0o001)  # traverse only: nothing becomes listable

    def _wait_listening(self, timeout_s: float) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # e.g. the port was taken meanwhile
            try:
                with socket.create_connection((LOOPBACK, self.address.port), timeout=0.5):
                    pass
            except OSError:
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
        rc = _stop(proc, 5.0)
        for line in _tail(self._log).splitlines():
            log.warning("mosquitto: %s", line)  # it only logs warnings and errors
        if rc != 0:
            log.warning("mosquitto exited with status %d", rc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


class GatewayProcess:
    """``hearth-gateway run`` against an existing broker, mDNS off, state under ``work_dir``.

    Its log goes to ``work_dir/gateway.log``; warnings and errors from it are repeated on our
    stderr when it stops, and its tail when it fails to come up.
    """

    def __init__(
        self,
        broker: BrokerAddress,
        work_dir: Path,
        *,
        gateway_id: str = "bench",
        workers: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.broker = broker
        self.gateway_id = gateway_id
        self.state_dir = work_dir / "gateway-state"
        self.log_path = work_dir / "gateway.log"
        self._workers = workers
        self._extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> Self:
        argv = [
            sys.executable, "-m", "hearth_gateway.cli", "run",
            "--broker", f"mqtt://{self.broker}",
            "--state-dir", str(self.state_dir),
            "--no-mdns",
            "--gateway-id", self.gateway_id,
        ]  # fmt: skip
        if self._workers is not None:
            argv += ["--workers", str(self._workers)]
        argv += self._extra_args
        self._proc = _spawn(argv, self.log_path)
        try:
            self._wait_online(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_online(self, timeout_s: float) -> None:
        """Until a ping through the broker is answered: the gateway is subscribed and serving."""
        assert self._proc is not None
        started = time.monotonic()
        deadline = started + timeout_s
        last = "not tried"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with status {self._proc.returncode}; its log:\n"
                    f"{_tail(self.log_path)}"
                )
            # A fresh client each try: a Client backs off for a while after a failed connect.
            with Client(gateway=str(self.broker), placement="edge", timeout_s=1.0) as probe:
                try:
                    probe.ping()
                except (GatewayUnavailable, TimeoutError) as exc:
                    last = str(exc) or type(exc).__name__
                else:
                    log.info(
                        "gateway pid %d online after %.1f s",
                        self._proc.pid,
                        time.monotonic() - started,
                    )
                    return
            time.sleep(0.2)
        raise RuntimeError(
            f"gateway not online within {timeout_s} s ({last}); its log:\n{_tail(self.log_path)}"
        )

    @property
    def pid(self) -> int | None:
        """The pid of the process we started (the ``_pdeathsig`` wrapper; the daemon is its
        child, see ``child_pids``), or None when not running."""
        return self._proc.pid if self._proc is not None else None

    def close(self, grace_s: float = 30.0) -> None:
        """SIGTERM (the gateway drains its jobs and publishes offline), wait, reap."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        rc = _stop(proc, grace_s)
        notable = [
            line
            for line in _tail(self.log_path, 10_000).splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]
        for line in notable[-_TAIL_LINES:]:
            log.warning("gateway: %s", line)
        if rc != 0:
            log.warning("gateway exited with status %d", rc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


# -- raw MQTT 5 request/response --------------------------------------------------------------


def _subscribe_and_wait(
    client: mqtt.Client, address: BrokerAddress, topics: list[tuple[str, int]], timeout_s: float
) -> None:
    """Connect (subscribing on every connect, as the SDK and gateway do) and wait for the
    broker to acknowledge the first subscription."""
    acked = threading.Event()

    def subscribe() -> None:
        client.subscribe(topics)

    client.on_subscribe = lambda *_: acked.set()
    connect(client, address, timeout_s=timeout_s, on_connected=subscribe)
    if not acked.wait(timeout_s):
        client.disconnect()
        client.loop_stop()
        raise TimeoutError(f"broker {address} did not acknowledge our subscription")


subscribe_and_wait = _subscribe_and_wait


class _EchoResponder:
    """Answers each request with its own payload on its Response Topic, with its Correlation
    Data, at its QoS: what the gateway does for a ping, without the gateway."""

    def __init__(self, address: BrokerAddress, topics: list[tuple[str, int]]) -> None:
        # Same client settings as the gateway's link (hearth_gateway.link).
        self._client = make_client(f"bench-echo-{uuid.uuid4().hex[:8]}", max_inflight=256)
        self._client.on_message = self._message
        _subscribe_and_wait(self._client, address, topics, 10.0)

    @staticmethod
    def _message(client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        response_topic = getattr(msg.properties, "ResponseTopic", None)
        if response_topic is None:
            return
        props = properties(PacketTypes.PUBLISH, content_type=True)  # as the gateway's link
        props.CorrelationData = getattr(msg.properties, "CorrelationData", b"")
        client.publish(response_topic, msg.payload, qos=msg.qos, properties=props)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _serve_echo(argv: Sequence[str]) -> int:
    """``echo-responder --broker HOST:PORT --topic TOPIC:QOS...``: answer until SIGTERM."""
    parser = argparse.ArgumentParser(prog="_common.py echo-responder")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", action="append", required=True, metavar="TOPIC:QOS")
    args = parser.parse_args(argv)
    topics = [(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in args.topic]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    responder = _EchoResponder(BrokerAddress.parse(args.broker), topics)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        responder.close()
    return 0


class EchoRequester:
    """Requests on ``topic`` at ``qos``, replies on a topic of its own; one Future per
    Correlation Data, resolved on paho's thread, as in the SDK's client."""

    def __init__(
        self, address: BrokerAddress, topic: str, qos: int, *, timeout_s: float = 10.0
    ) -> None:
        self._topic = topic
        self._qos = qos
        self._timeout_s = timeout_s
        name = f"bench-req-{uuid.uuid4().hex[:8]}"
        self._reply_topic = f"bench/reply/{name}"
        self._pending: dict[bytes, Future[None]] = {}
        self._lock = threading.Lock()
        # Same client settings as the SDK's connection (hearth._connection).
        self._client = make_client(name)
        self._client.on_message = self._message
        _subscribe_and_wait(self._client, address, [(self._reply_topic, qos)], timeout_s)

    def _message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None)
        with self._lock:
            future = self._pending.pop(correlation, None) if correlation else None
        if future is not None:
            future.set_result(None)

    def send(self, payload: bytes) -> Future[None]:
        """Publish one request; the Future resolves when its echo arrives."""
        correlation = uuid.uuid4().bytes
        future: Future[None] = Future()
        with self._lock:
            self._pending[correlation] = future
        self._client.publish(
            self._topic,
            payload,
            qos=self._qos,
            properties=publish_properties(self._reply_topic, correlation),
        )
        return future

    def call(self, payload: bytes, timeout_s: float | None = None) -> None:
        """One blocking round trip; TimeoutError when no echo comes back in time."""
        future = self.send(payload)
        try:
            future.result(self._timeout_s if timeout_s is None else timeout_s)
        except FutureTimeout:
            with self._lock:
                self._pending = {k: f for k, f in self._pending.items() if f is not future}
            raise TimeoutError("no echo came back") from None

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


class EchoResponderProcess:
    """The echo responder as a subprocess, answering on ``topics`` [(topic, QoS)]."""

    def __init__(
        self, broker: BrokerAddress, work_dir: Path, topics: Sequence[tuple[str, int]]
    ) -> None:
        self.broker = broker
        self.topics = list(topics)
        self.log_path = work_dir / "echo-responder.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> Self:
        argv = [sys.executable, str(Path(__file__).resolve()), "echo-responder"]
        argv += ["--broker", str(self.broker)]
        for topic, qos in self.topics:
            argv += ["--topic", f"{topic}:{qos}"]
        self._proc = _spawn(argv, self.log_path)
        try:
            self._wait_answering(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_answering(self, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        topic, qos = self.topics[0]
        with EchoRequester(self.broker, topic, qos, timeout_s=timeout_s) as probe:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                try:
                    probe.call(b"probe", timeout_s=0.5)
                except TimeoutError:
                    continue
                log.info("echo responder pid %d answering", self._proc.pid)
                return
        raise RuntimeError(f"echo responder not answering; its log:\n{_tail(self.log_path)}")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and _stop(proc, 5.0) != 0:
            log.warning("echo responder exited with status %s", proc.returncode)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


# -- CPU accounting ---------------------------------------------------------------------------


def _proc_stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used) of one process, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # After the command name: state, ppid, ..., utime and stime at 11 and 12 (in clock ticks).
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int | None = None) -> float:
    """CPU seconds (user + system) used so far by ``root`` (default: this process) and every
    live descendant. Linux only: NaN without /proc. Descendants that exited are not counted,
    so take differences over spans where the set of processes stays the same."""
    if not Path("/proc/self/stat").exists():
        return math.nan
    root = os.getpid() if root is None else root
    stats = {
        int(pid): st for pid in os.listdir("/proc") if pid.isdigit() and (st := _proc_stat(pid))
    }
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def child_pids(pid: int) -> list[int]:
    """The live direct children of ``pid``, from /proc (empty without it)."""
    if not Path("/proc/self/stat").exists():
        return []
    return sorted(
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and (st := _proc_stat(p)) and st[0] == pid
    )


def proc_cmdline(pid: int) -> list[str]:
    """A process's argv, from /proc; empty if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def proc_memory_bytes(pid: int, field: str = "VmRSS") -> int | None:
    """A memory figure of one process from /proc/PID/status (``VmRSS``, ``RssAnon``, ...), in
    bytes; None if the process is gone or the field is missing."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024  # always reported in kB
    return None


# -- figures ----------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted values, interpolating linearly between
    the closest ranks (numpy's default)."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Summary:
    """Latency figures of one series, in ms."""

    n: int
    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Summary:
        ordered = sorted(samples_ms)
        if not ordered:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            n=len(ordered),
            p50=percentile(ordered, 50),
            p90=percentile(ordered, 90),
            p99=percentile(ordered, 99),
            mean=sum(ordered) / len(ordered),
            min=ordered[0],
            max=ordered[-1],
        )


def verdict(value: float, target: float, *, at_most: bool) -> str:
    """PASS or MISS against a target; ``at_most`` for ceilings (ratios of latencies)."""
    ok = value <= target if at_most else value >= target
    return "PASS" if ok else "MISS"


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, title: str = ""
) -> None:
    """A plain aligned text table on stdout; floats with 3 decimals, text left-aligned."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.3f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
        for i, h in enumerate(headers)
    ]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) if rows else False
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    if title:
        print(title)
    print(line([str(h) for h in headers]))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))
    print()


def _json_ready(value: object) -> object:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 4)
    return value


def emit_json(figures: Mapping[str, object]) -> None:
    """Exactly one line of JSON on stdout: the named figures (NaN becomes null)."""
    out = {key: _json_ready(value) for key, value in figures.items()}
    sys.stdout.write(json.dumps(out, separators=(",", ":"), allow_nan=False) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:2] != ["echo-responder"]:
        sys.exit("usage: _common.py echo-responder --broker HOST:PORT --topic TOPIC:QOS...")
    sys.exit(_serve_echo(sys.argv[2:]))
