"""Shared parts of the benchmark programs: real processes on loopback, figures out.

- From testkit (the harness the tests use too): ``Mosquitto``, a broker on a free 127.0.0.1
  port configured by the gateway's own ``mosquitto_config()`` (so it has ``set_tcp_nodelay
  true`` like the managed one); ``GatewayProcess``, ``hearth-gateway run`` as a subprocess
  against it, waited for until it is online, stopped with SIGTERM (it drains) and reaped;
  ``ensure_examples``; and the /proc readers, among them ``tree_cpu_s``: CPU time used by a
  process tree (all of a benchmark's processes), for figures that do not depend on how busy the
  machine is.
- ``EchoResponderProcess`` and ``EchoRequester``: the raw MQTT 5 request/response baseline. The
  responder is a process of its own (``python benchmarks/_common.py echo-responder ...``), as
  the gateway is, so the baseline does not share an interpreter (and its GIL) with the caller.
- ``RoleCpu``: CPU time per role (this process, the broker, the daemon, its workers...), for
  figures of what each process costs per request.
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
import signal
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

from hearth.transport import BrokerAddress, connect, make_client, properties, publish_properties

# testkit/ is not installed: it is imported from the repository root. Every benchmark imports
# this module first (`_common` sorts before the other first-party modules), so they can import
# testkit themselves too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.examples import REPO_ROOT, ensure_examples
from testkit.gateway import GatewayProcess
from testkit.mosquitto import Mosquitto
from testkit.net import LOOPBACK, free_port
from testkit.procs import child_pids, proc_cmdline, proc_memory_bytes, spawn, stop, tail, tree_cpu_s

__all__ = [
    "LOOPBACK",
    "REPO_ROOT",
    "EchoRequester",
    "EchoResponderProcess",
    "GatewayProcess",
    "Mosquitto",
    "RoleCpu",
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

    @property
    def pid(self) -> int:
        """The responder's pid (its supervisor's child, as for Mosquitto)."""
        assert self._proc is not None
        children = child_pids(self._proc.pid)
        return children[0] if children else self._proc.pid

    def start(self, timeout_s: float = 20.0) -> Self:
        argv = [sys.executable, str(Path(__file__).resolve()), "echo-responder"]
        argv += ["--broker", str(self.broker)]
        for topic, qos in self.topics:
            argv += ["--topic", f"{topic}:{qos}"]
        self._proc = spawn(argv, self.log_path, supervised=True)
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
        raise RuntimeError(f"echo responder not answering; its log:\n{tail(self.log_path)}")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and stop(proc, 5.0) != 0:
            log.warning("echo responder exited with status %s", proc.returncode)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()


# -- figures ----------------------------------------------------------------------------------


class RoleCpu:
    """CPU seconds used by each of a benchmark's processes, by role. ``roles`` maps a name to
    (pid, what): "self" the process alone (its children are other roles), "tree" it and its
    descendants, "children" its descendants only (a daemon's workers). Take differences of
    ``sample()`` over spans where the processes stay the same (a process that exits takes its
    CPU time with it)."""

    def __init__(self, roles: Mapping[str, tuple[int, str]]) -> None:
        self.roles = dict(roles)

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, (pid, what) in self.roles.items():
            children = sum(tree_cpu_s(child) for child in child_pids(pid))
            if what == "children":
                out[name] = children
            elif what == "self":
                out[name] = tree_cpu_s(pid) - children
            else:
                out[name] = tree_cpu_s(pid)
        return out

    @staticmethod
    def since(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in after}


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
