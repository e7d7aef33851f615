"""The fault suite: Hearth under the faults a home box meets, injected for real, in one table.

Each scenario starts its own gateway (and broker) on 127.0.0.1 or inside network namespaces it
creates, streams jobs through the SDK while it injects its fault, and counts:

- sent: jobs the device sent (each with a stdin of its own, run by ``echo.wasm``, so each answer
  can be checked against its job);
- lost: jobs that got neither an answer nor an error by their deadline (the caller never heard);
- twice: answers the caller got that were not its own job's output (a job answered twice with
  different answers shows here), plus jobs the gateway ran more than once while it stayed up
  (its ``jobs_completed`` against the jobs answered from the edge);
- errors: what reached the caller, by error code (``GatewayUnavailable`` as ``unavailable``);
- recovery: from the fault's end (or its injection, for a kill) to the next job answered;
- RSS: the daemon's, its workers' and the broker's resident memory before and after, in MiB.

Scenarios (``--only NAME`` runs some):

- ``broker-kill``: SIGKILL of the gateway's managed Mosquitto mid-stream, ``edge`` placement:
  the daemon restarts the broker, the SDK re-sends what was in flight with the same job ids;
- ``gateway-kill``: SIGKILL of the daemon mid-stream, restarted 0.5 s later on the same state;
- ``restart-storm``: that, repeated;
- ``disk-full``: the state directory on a small tmpfs, filled; jobs and a blob upload must get
  ``storage_full`` within 2 s, and work again once the filler is deleted; no traceback logged;
- ``partition``: device and gateway in two network namespaces joined by a veth pair, whose
  device end is set down for 3 s mid-stream (``ip link set down``; tc netem is not available),
  once with ``auto`` placement (every job completes, the table says where) and once with
  ``edge`` (each job completes within its deadline or raises with a reason);
- ``fuzz``: structure-aware fuzzing (hypothesis) of every request type: messages built from the
  protocol's own types, with fields dropped, added, of the wrong type or out of range, plus
  truncated and random payloads, published raw; the daemon must stay up and answer, a good job
  must work after, and its RSS come back within 20 % of its start;
- ``slow-consumers``: clients that send requests and never read their socket; the broker's RSS
  must stay bounded (its per-client queue limits), the drops are counted.

Scenarios that need root (namespaces, tmpfs) are skipped, with the reason, without it.

    .venv/bin/python benchmarks/faults.py             # table
    .venv/bin/python benchmarks/faults.py --quick     # the bounded form CI runs
    .venv/bin/python benchmarks/faults.py --json      # one JSON line on stdout
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    GatewayProcess,
    Mosquitto,
    ensure_examples,
    print_table,
    proc_cmdline,
    proc_memory_bytes,
    run_and_report,
    setup_logging,
)
from hearth import Client, WasmRun
from hearth.errors import GatewayUnavailable, HearthError
from hearth.transport import BrokerAddress
from testkit.net import LOOPBACK, free_port
from testkit.procs import child_pids
from testkit.wait import wait_until

log = logging.getLogger("faults")

MIB = 1024 * 1024
FUZZ_RSS_TOLERANCE = 0.20  # the daemon's RSS after fuzzing, against its start
SLOW_CONSUMER_SLACK_MIB = 32.0  # the broker's own growth beyond its per-client bounds
SLOW_ANSWER = 512 * 1024  # bytes a slow consumer's job echoes back
DISK_FULL_REPLY_S = 2.0


@dataclass(frozen=True)
class Sizes:
    jobs: int  # per stream
    in_flight: int
    storm_cycles: int
    fuzz_examples: int
    slow_clients: int
    slow_requests: int


FULL = Sizes(
    jobs=500, in_flight=8, storm_cycles=10, fuzz_examples=3000, slow_clients=3, slow_requests=200
)
QUICK = Sizes(
    jobs=200, in_flight=8, storm_cycles=3, fuzz_examples=600, slow_clients=2, slow_requests=100
)


@dataclass
class Row:
    fault: str
    injected: int = 0
    sent: int = 0
    answered: int = 0
    lost: int = 0
    twice: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    where: Counter[str] = field(default_factory=Counter)
    recovery_s: float | None = None
    rss_mib: dict[str, list[float]] = field(default_factory=dict)  # process: [before, after]
    checks: dict[str, bool] = field(default_factory=dict)  # the scenario's must-shows
    note: str = ""
    skipped: str = ""

    def figures(self) -> dict[str, Any]:
        return {
            "injected": self.injected,
            "sent": self.sent,
            "answered": self.answered,
            "lost": self.lost,
            "twice": self.twice,
            "errors": dict(self.errors),
            "where": dict(self.where),
            "recovery_s": self.recovery_s,
            "rss_mib": self.rss_mib,
            "checks": self.checks,
            "ok": self.ok,
            "note": self.note,
            "skipped": self.skipped,
        }

    @property
    def ok(self) -> bool:
        return not self.skipped and all(self.checks.values())


@dataclass
class Outcome:
    rows: list[Row]
    figures: dict[str, Any] = field(default_factory=dict)


# --- the job stream --------------------------------------------------------------------------


@dataclass
class _Job:
    index: int
    job_id: str
    stdin: bytes
    sent_at: float
    future: Future[WasmRun]
    done_at: float = 0.0


class Stream:
    """Jobs sent with ``in_flight`` outstanding at most, each checked against its own stdin."""

    def __init__(self, client: Client, module: bytes, *, in_flight: int, where: str) -> None:
        self._client = client
        self._module = module
        self._slots = threading.Semaphore(in_flight)
        self._where = where
        self.jobs: list[_Job] = []
        self._prefix = uuid.uuid4().hex[:8]

    def send(
        self, n: int, *, pause_s: float = 0.0, on_sent: Callable[[int], None] | None = None
    ) -> None:
        for i in range(n):
            self._slots.acquire()
            index = len(self.jobs)
            stdin = f"{self._prefix}-{index}-".encode() + os.urandom(24).hex().encode()
            job_id = f"fault-{self._prefix}-{index}"
            future = self._client.run_wasm_async(
                self._module, stdin=stdin, job_id=job_id, where=self._where
            )
            job = _Job(index, job_id, stdin, time.monotonic(), future)
            self.jobs.append(job)
            future.add_done_callback(lambda _f, job=job: self._done(job))
            if on_sent is not None:
                on_sent(i)
            if pause_s:
                time.sleep(pause_s)

    def _done(self, job: _Job) -> None:
        job.done_at = time.monotonic()
        self._slots.release()

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for job in self.jobs:
            with contextlib.suppress(Exception):
                job.future.result(max(0.0, deadline - time.monotonic()))

    def count(self, row: Row, after: float | None = None) -> None:
        """Add this stream's outcome to ``row``; ``after``: the fault's end, for recovery."""
        row.sent += len(self.jobs)
        first_after: float | None = None
        for job in self.jobs:
            if not job.future.done():
                row.lost += 1
                continue
            exc = job.future.exception()
            if exc is not None:
                row.errors[_code(exc)] += 1
                continue
            run = job.future.result()
            row.answered += 1
            row.where[run.where] += 1
            if run.stdout != job.stdin or run.job_id != job.job_id:
                row.twice += 1
            if after is not None and job.done_at >= after and job.sent_at >= after - 30:
                first_after = job.done_at if first_after is None else min(first_after, job.done_at)
        if after is not None and first_after is not None:
            row.recovery_s = round(max(0.0, first_after - after), 3)


def _code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if code is not None:
        return str(code)
    if isinstance(exc, GatewayUnavailable):
        return "unavailable"
    return type(exc).__name__


# --- processes and their memory --------------------------------------------------------------


def _rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    rss = proc_memory_bytes(pid)
    return round((rss or 0) / MIB, 1)


def _broker_pid(gw: GatewayProcess) -> int | None:
    """The managed Mosquitto of ``gw``: found by its configuration path, never by name."""
    conf = str(gw.state_dir / "mosquitto" / "mosquitto.conf")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = proc_cmdline(int(entry.name))
            if len(argv) == 3 and argv[1:] == ["-c", conf]:
                return int(entry.name)
    return None


def _memory(gw: GatewayProcess, broker_pid: int | None) -> dict[str, float]:
    daemon = gw.daemon_pid()
    workers = [
        pid for pid in child_pids(daemon) if "hearth_gateway.worker" in " ".join(proc_cmdline(pid))
    ]
    return {
        "daemon": _rss_mib(daemon),
        "workers": round(sum(_rss_mib(pid) for pid in workers), 1),
        "broker": _rss_mib(broker_pid),
    }


def _record_memory(row: Row, before: dict[str, float], after: dict[str, float]) -> None:
    row.rss_mib = {name: [before[name], after.get(name, 0.0)] for name in before}


def _tracebacks(gw: GatewayProcess) -> int:
    return gw.log().count("Traceback")


def _completed(gw: GatewayProcess) -> int:
    return gw.snapshot().jobs_completed


def _handled(gw: GatewayProcess) -> int:
    """Jobs the gateway has answered, one way or another."""
    snap = gw.snapshot()
    return snap.jobs_completed + snap.jobs_refused


def _managed(work: Path, *, workers: int = 2, extra: Sequence[str] = ()) -> GatewayProcess:
    listen = BrokerAddress(LOOPBACK, free_port())
    return GatewayProcess(listen, work, managed=True, workers=workers, extra_args=extra)


def _warm(client: Client, module: bytes) -> None:
    """One job first: the module is then stored on the gateway, so uploads do not blur the
    fault's figures."""
    client.run_wasm(module, stdin=b"warm", where="edge")


# --- scenarios -------------------------------------------------------------------------------


def broker_kill(tmp: Path, sizes: Sizes, module: bytes) -> Row:
    row = Row("broker SIGKILL (edge)")
    with _managed(tmp / "broker-kill") as gw, gw.client(timeout_s=30.0) as client:
        _warm(client, module)
        broker = _broker_pid(gw)
        before = _memory(gw, broker)
        completed_before = _completed(gw)
        stream = Stream(client, module, in_flight=sizes.in_flight, where="edge")
        killed_at: list[float] = []

        def inject(i: int) -> None:
            if i == sizes.jobs // 3 and broker is not None:
                os.kill(broker, signal.SIGKILL)
                killed_at.append(time.monotonic())
                row.injected += 1

        stream.send(sizes.jobs, on_sent=inject)
        stream.wait(60)
        stream.count(row, after=killed_at[0] if killed_at else None)
        ran = _completed(gw) - completed_before
        row.twice += max(0, ran - row.where["edge"])
        _record_memory(row, before, _memory(gw, _broker_pid(gw)))
        row.checks = {
            "no error reached the caller": not row.errors,
            "none lost": row.lost == 0,
            "none answered twice": row.twice == 0,
            "broker replaced": _broker_pid(gw) not in (None, broker),
        }
    return row


def gateway_kill(tmp: Path, sizes: Sizes, module: bytes, *, cycles: int = 1) -> Row:
    row = Row("gateway SIGKILL" if cycles == 1 else f"restart storm ({cycles} kills)")
    with _managed(tmp / f"gateway-kill-{cycles}") as gw, gw.client(timeout_s=60.0) as client:
        _warm(client, module)
        before = _memory(gw, _broker_pid(gw))
        stream = Stream(client, module, in_flight=sizes.in_flight, where="edge")
        kill_every = max(1, sizes.jobs // (cycles + 1))
        last_kill: list[float] = []

        def inject(i: int) -> None:
            if i and i % kill_every == 0 and row.injected < cycles:
                last_kill.append(time.monotonic())
                gw.kill()
                row.injected += 1
                time.sleep(0.5)
                gw.start()

        stream.send(sizes.jobs, on_sent=inject)
        stream.wait(120)
        stream.count(row, after=last_kill[-1] if last_kill else None)
        _record_memory(row, before, _memory(gw, _broker_pid(gw)))
        row.note = "restarted 0.5 s after each kill; recovery from the last kill"
        row.checks = {
            "no error reached the caller": not row.errors,
            "none lost": row.lost == 0,
            "none answered twice": row.twice == 0,
        }
    return row


def disk_full(tmp: Path, sizes: Sizes, module: bytes) -> Row:
    row = Row("disk full (tmpfs)")
    if os.geteuid() != 0:
        row.skipped = "needs root to mount a tmpfs"
        return row
    work = tmp / "disk-full"
    state = work / "state"
    state.mkdir(parents=True)
    # 256 MiB: room above the default reserve (64 MiB kept free), which the filler then takes.
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256m", "hearth-faults", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        row.skipped = f"cannot mount a tmpfs: {mounted.stderr.strip()}"
        return row
    try:
        with Mosquitto(work) as broker:
            gw = GatewayProcess(BrokerAddress(LOOPBACK, broker.port), work, workers=2)
            with gw, gw.client(timeout_s=10.0) as client:
                _warm(client, module)
                before = _memory(gw, broker.pid)
                filler = state / "filler"
                _fill(filler)
                row.injected = 1
                # Once it has looked: its free-space figure may be a second old (a job in that
                # second runs and is answered: not lost); housekeeping looks every 2 s.
                wait_until(lambda: gw.snapshot().storage_full, 10, step_s=0.1)
                quick = 0
                stream = Stream(client, module, in_flight=1, where="edge")
                for _ in range(10):
                    started = time.monotonic()
                    stream.send(1)
                    stream.wait(15)
                    quick += time.monotonic() - started <= DISK_FULL_REPLY_S
                # A module the gateway has never seen: its upload must be refused too.
                fresh = _with_custom_section(module, os.urandom(64 * 1024))
                started = time.monotonic()
                upload: list[str] = []
                try:
                    client.run_wasm(fresh, stdin=b"x", where="edge")
                    upload.append("ran")
                except HearthError as exc:
                    upload.append(_code(exc))
                upload_s = time.monotonic() - started
                counted = Row("")
                stream.count(counted)
                row.sent, row.errors, row.lost = counted.sent, counted.errors, counted.lost
                row.answered = counted.answered
                row.errors["upload: " + upload[0]] += 1
                alive = gw.proc is not None and gw.proc.poll() is None
                filler.unlink()
                freed = time.monotonic()
                after_stream = Stream(client, module, in_flight=1, where="edge")
                recovered = wait_until(lambda: _one(after_stream, client, module), 30, step_s=0.2)
                row.recovery_s = round(time.monotonic() - freed, 3) if recovered else None
                recount = Row("")
                after_stream.count(recount)
                row.sent += recount.sent
                row.answered += recount.answered
                _record_memory(row, before, _memory(gw, broker.pid))
                row.note = f"upload answered in {upload_s:.2f} s"
                row.checks = {
                    "jobs refused with storage_full within 2 s": (
                        counted.errors["storage_full"] == 10 and quick == 10
                    ),
                    "upload refused with storage_full within 2 s": (
                        upload == ["storage_full"] and upload_s <= DISK_FULL_REPLY_S
                    ),
                    "daemon stayed up": alive,
                    "next job ran once space returned": recovered,
                    "no traceback in the log": _tracebacks(gw) == 0,
                }
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
    return row


def _fill(path: Path) -> None:
    """Fill the filesystem of ``path`` to its last byte (unbuffered: nothing left to flush)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (MIB, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)


def _one(stream: Stream, client: Client, module: bytes) -> bool:
    stream.send(1)
    stream.wait(15)
    return stream.jobs[-1].future.exception() is None


def _with_custom_section(module: bytes, payload: bytes) -> bytes:
    """``module`` plus a custom section (ignored by every runtime): same code, new hash."""
    name = b"hearth-faults"
    body = _leb(len(name)) + name + payload
    return module + b"\x00" + _leb(len(body)) + body


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# --- partition: two namespaces, the link set down mid-stream -------------------------------


@dataclass
class _Netns:
    dev: str
    gw: str
    dev_if: str
    dev_ip: str
    gw_ip: str


@contextlib.contextmanager
def _namespaces() -> Iterator[_Netns]:
    suffix = uuid.uuid4().hex[:6]
    subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    ns = _Netns(
        f"hearth-fd-{suffix}", f"hearth-fg-{suffix}", f"fd{suffix}", f"{subnet}.1", f"{subnet}.2"
    )
    created: list[str] = []
    try:
        for name in (ns.dev, ns.gw):
            _ip("netns", "add", name)
            created.append(name)
        gw_if = f"fg{suffix}"
        _ip(
            "-n",
            ns.dev,
            "link",
            "add",
            ns.dev_if,
            "type",
            "veth",
            "peer",
            "name",
            gw_if,
            "netns",
            ns.gw,
        )
        _ip("-n", ns.dev, "addr", "add", f"{ns.dev_ip}/24", "dev", ns.dev_if)
        _ip("-n", ns.gw, "addr", "add", f"{ns.gw_ip}/24", "dev", gw_if)
        for name, iface in ((ns.dev, ns.dev_if), (ns.gw, gw_if), (ns.dev, "lo"), (ns.gw, "lo")):
            _ip("-n", name, "link", "set", iface, "up")
        yield ns
    finally:
        for name in created:
            for pid in _ip("netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)


def _ip(*argv: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def partition(tmp: Path, sizes: Sizes, module_path: Path, placement: str) -> Row:
    row = Row(f"partition 3 s ({placement})")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        row.skipped = "needs root and iproute2 to create network namespaces"
        return row
    with _namespaces() as ns:
        work = tmp / f"partition-{placement}"
        work.mkdir()
        state = work / "state"
        state.mkdir()
        port = free_port()
        gw_log = work / "gateway.log"
        gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        argv = [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "run",
            "--gateway-id",
            gateway_id,
            "--state-dir",
            str(state),
            "--listen",
            f"{ns.gw_ip}:{port}",
            "--workers",
            "2",
            "--no-mdns",
        ]
        with gw_log.open("ab") as out:
            gw = subprocess.Popen(
                ["ip", "netns", "exec", ns.gw, *argv], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            from hearth_gateway.status import read_snapshot

            def online() -> bool:
                snap = read_snapshot(state)
                return snap is not None and snap.state == "online" and snap.pid == gw.pid

            if not wait_until(online, 60, step_s=0.1):
                raise RuntimeError(f"gateway not online:\n{gw_log.read_text(errors='replace')}")
            spec = {
                "gateway": f"{ns.gw_ip}:{port}",
                "module": str(module_path),
                "jobs": sizes.jobs,
                "in_flight": sizes.in_flight,
                "placement": placement,
                "timeout_s": 15.0,
            }
            device = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns.dev,
                    sys.executable,
                    __file__,
                    "_device",
                    json.dumps(spec),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            # Down a third of the way in: the device prints one line a job.
            assert device.stdout is not None
            downs: list[float] = []
            lines: list[str] = []
            for line in device.stdout:
                lines.append(line.decode())
                if len(lines) == sizes.jobs // 3 and not downs:
                    _ip("-n", ns.dev, "link", "set", ns.dev_if, "down")
                    row.injected = 1
                    downs.append(time.monotonic())
                    threading.Timer(
                        3.0, _ip, args=("-n", ns.dev, "link", "set", ns.dev_if, "up")
                    ).start()
            device.wait(timeout=300)
            report = json.loads(lines[-1])
        finally:
            gw.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                gw.wait(timeout=30)
    row.sent, row.answered, row.lost = report["sent"], report["answered"], report["lost"]
    row.twice = report["twice"]
    row.errors.update(report["errors"])
    row.where.update(report["where"])
    row.recovery_s = report["recovery_s"]
    if placement == "auto":
        row.checks = {"every job completed": row.answered == row.sent, "none lost": row.lost == 0}
    else:
        reasons = report["reasons"]
        row.checks = {
            "each job completed or raised with a reason": row.lost == 0 and all(reasons),
            "none answered twice": row.twice == 0,
        }
    row.note = "device end of the veth down 3 s"
    return row


def _device(spec_json: str) -> int:
    """Runs inside the device namespace: streams jobs, one line a job, then a JSON report."""
    spec = json.loads(spec_json)
    module = Path(spec["module"]).read_bytes()
    partition_at: float | None = None
    with Client(
        spec["gateway"], placement=spec["placement"], timeout_s=spec["timeout_s"]
    ) as client:
        client.run_wasm(module, stdin=b"warm")
        stream = Stream(client, module, in_flight=spec["in_flight"], where=spec["placement"])

        def sent(i: int) -> None:
            nonlocal partition_at
            print(i, flush=True)
            if i == spec["jobs"] // 3:
                partition_at = time.monotonic()

        stream.send(spec["jobs"], pause_s=0.02, on_sent=sent)
        stream.wait(spec["timeout_s"] * 3)
        row = Row("")
        stream.count(row, after=(partition_at + 3.0) if partition_at else None)
        reasons = [
            str(job.future.exception())
            for job in stream.jobs
            if job.future.done() and job.future.exception() is not None
        ]
    print(
        json.dumps(
            {
                "sent": row.sent,
                "answered": row.answered,
                "lost": row.lost,
                "twice": row.twice,
                "errors": row.errors,
                "where": row.where,
                "recovery_s": row.recovery_s,
                "reasons": reasons,
            }
        ),
        flush=True,
    )
    return 0


# --- fuzzing ---------------------------------------------------------------------------------


def fuzz(tmp: Path, sizes: Sizes, module: bytes) -> Row:
    import msgspec
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from hearth.protocol import messages
    from hearth.protocol.codec import decode_reply
    from hearth.protocol.topics import reply_prefix, reply_topic, request_topic
    from hearth.transport import make_client, publish_properties

    row = Row("fuzz (every request type)")
    with _managed(tmp / "fuzz") as gw, gw.client(timeout_s=10.0) as client:
        _warm(client, module)
        broker = _broker_pid(gw)
        before = _memory(gw, broker)
        daemon = gw.daemon_pid()
        fuzzer_id = f"fuzz-{uuid.uuid4().hex[:6]}"
        replies: Counter[str] = Counter()
        lock = threading.Lock()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            try:
                reply = decode_reply(msg.payload)
                key = str(getattr(reply, "code", type(reply).__name__))
            except HearthError as exc:
                key = f"undecodable reply ({exc})"
            with lock:
                replies[key] += 1

        raw = make_client(fuzzer_id)
        raw.on_message = on_message
        raw.connect(gw.listen.host, gw.listen.port)
        raw.loop_start()
        raw.subscribe(reply_prefix(fuzzer_id) + "#", qos=1)
        time.sleep(0.3)
        topic = request_topic(gw.gateway_id, fuzzer_id)
        sent = [0]

        def publish(payload: bytes) -> None:
            props = publish_properties(reply_topic(fuzzer_id), uuid.uuid4().bytes)
            raw.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)
            sent[0] += 1

        request_types = list(typing.get_args(messages.Request))
        strategy = st.one_of(
            st.one_of(*(_message(t) for t in request_types)).map(msgspec.msgpack.encode),
            st.binary(max_size=512),
            st.one_of(*(_message(t) for t in request_types))
            .map(msgspec.msgpack.encode)
            .flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda n: b[:n])),
        )

        @settings(
            max_examples=sizes.fuzz_examples,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        )
        @given(strategy)
        def one(payload: bytes) -> None:
            publish(payload)

        started = time.monotonic()
        one()
        row.injected = sent[0]
        # Every message published; the daemon must still answer at once, and run work.
        wait_until(lambda: sum(replies.values()) >= sent[0], 30, step_s=0.2)
        ping_s = _ping_s(client)
        good = Stream(client, module, in_flight=4, where="edge")
        good.send(20)
        good.wait(30)
        good.count(row)
        row.recovery_s = round(ping_s, 3)
        raw.loop_stop()
        raw.disconnect()
        # Workers recycled between jobs past their RSS limit; give the daemon a moment to settle.
        time.sleep(1.0)
        after = _memory(gw, _broker_pid(gw))
        _record_memory(row, before, after)
        with lock:
            row.errors.update({f"fuzz: {k}": v for k, v in replies.items()})
        unanswered = sent[0] - sum(replies.values())
        row.note = (
            f"{sent[0]} messages in {time.monotonic() - started:.0f} s, {unanswered} with no reply"
        )
        row.checks = {
            "daemon stayed up (same pid)": gw.daemon_pid() == daemon,
            "answers a ping within 2 s after": ping_s <= 2.0,
            "good jobs work after": row.answered == 20 and row.twice == 0,
            "daemon RSS within 20 % of its start": (
                after["daemon"] <= before["daemon"] * (1 + FUZZ_RSS_TOLERANCE)
            ),
            "no traceback in the log": _tracebacks(gw) == 0,
        }
    return row


def _message(cls: Any) -> Any:
    """A hypothesis strategy of dicts shaped like ``cls`` (a protocol message): every field of
    its type, mostly, and now and then of another type, missing, or an unknown field."""
    import msgspec
    from hypothesis import strategies as st

    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    required = {f.encode_name: _value(f.type) for f in info.fields if f.required}
    optional = {f.encode_name: _value(f.type) for f in info.fields if not f.required}
    if "v" in optional:  # mostly this version: other versions are refused before anything else
        optional["v"] = st.one_of(st.just(1), optional["v"])
    tag = {info.tag_field: st.just(info.tag)} if info.tag_field else {}
    return st.fixed_dictionaries({**tag, **required}, optional=optional).flatmap(_mutate)


def _mutate(message: dict[str, Any]) -> Any:
    from hypothesis import strategies as st

    keys = sorted(message)
    if not keys:
        return st.just(message)
    ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
    junk = st.one_of(
        st.none(),
        ints,
        st.text(max_size=16),
        st.binary(max_size=16),
        st.lists(ints, max_size=3),
        st.floats(),
    )
    return st.one_of(
        st.just(message),
        st.tuples(st.sampled_from(keys), junk).map(lambda kv: {**message, kv[0]: kv[1]}),
        st.sampled_from(keys).map(lambda k: {n: v for n, v in message.items() if n != k}),
        st.text(min_size=1, max_size=8).map(lambda k: {**message, f"x-{k}": 1}),
    )


def _value(t: Any) -> Any:
    import msgspec
    from hypothesis import strategies as st

    mi = msgspec.inspect
    match t:
        case mi.IntType():
            lo = t.ge if t.ge is not None else -(2**63)
            hi = t.le if t.le is not None else 2**64 - 1
            return st.integers(lo, hi)
        case mi.FloatType():
            return st.floats(allow_nan=True)
        case mi.StrType():
            if t.pattern is not None:  # ids and hashes: valid ones get past the decoder
                return st.from_regex(t.pattern, fullmatch=True)
            return st.text(max_size=t.max_length or 48)
        case mi.BytesType() | mi.ByteArrayType() | mi.MemoryViewType():
            return st.binary(max_size=min(t.max_length or 4096, 4096))
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.LiteralType():
            return st.sampled_from(t.values)
        case mi.EnumType():
            return st.sampled_from([m.value for m in t.cls])
        case mi.ListType() | mi.SetType() | mi.FrozenSetType() | mi.VarTupleType():
            return st.lists(_value(t.item_type), max_size=4)
        case mi.TupleType():
            return st.tuples(*(_value(i) for i in t.item_types)).map(list)
        case mi.DictType():
            return st.dictionaries(_value(t.key_type), _value(t.value_type), max_size=4)
        case mi.UnionType():
            return st.one_of(*(_value(i) for i in t.types))
        case mi.StructType():
            return st.deferred(lambda: _message(t.cls))
        case mi.Metadata():
            return _value(t.type)
        case _:
            return st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=8))


def _ping_s(client: Client) -> float:
    started = time.monotonic()
    client.ping()
    return time.monotonic() - started


# --- slow consumers --------------------------------------------------------------------------


def slow_consumers(tmp: Path, sizes: Sizes, module: bytes) -> Row:
    """Clients that send jobs with large answers (echo of 512 KiB) and never read their socket:
    Mosquitto queues the answers for them; its per-client bounds must cap that."""
    import hashlib
    import socket

    from hearth.protocol.codec import encode
    from hearth.protocol.messages import WasmJob
    from hearth.protocol.topics import reply_prefix, request_topic

    row = Row("slow consumers")
    digest = hashlib.sha256(module).hexdigest()
    with _managed(tmp / "slow") as gw, gw.client(timeout_s=30.0) as client:
        _warm(client, module)
        broker = _broker_pid(gw)
        before = _memory(gw, broker)
        sockets: list[socket.socket] = []
        for n in range(sizes.slow_clients):
            client_id = f"slow-{n}-{uuid.uuid4().hex[:6]}"
            sock = socket.create_connection((gw.listen.host, gw.listen.port))
            # Small buffers: the kernel must not soak up what Mosquitto would otherwise queue.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(_connect(client_id))
            sock.sendall(_subscribe(reply_prefix(client_id) + "#"))
            topic = request_topic(gw.gateway_id, client_id)
            for i in range(sizes.slow_requests):
                job = WasmJob(job_id=f"slow-{i}", module=digest, stdin=os.urandom(SLOW_ANSWER))
                sock.sendall(_publish(topic, encode(job), reply_prefix(client_id) + "reply", i))
            sockets.append(sock)
            row.injected += 1
        row.sent = sizes.slow_clients * sizes.slow_requests
        queued_mib = row.sent * SLOW_ANSWER / MIB
        # Until the gateway has answered them all (or given up): then the broker holds what it
        # holds.
        wait_until(lambda: _handled(gw) >= row.sent, 30, step_s=0.5)
        after = _memory(gw, _broker_pid(gw))
        ping_s = _ping_s(client)
        good = Stream(client, module, in_flight=4, where="edge")
        good.send(20)
        good.wait(30)
        good.count(row)
        for sock in sockets:
            sock.close()
        _record_memory(row, before, after)
        dropped = getattr(gw.snapshot(), "broker_dropped", None)
        row.note = f"{queued_mib:.0f} MiB of answers never read" + (
            f"; broker dropped {dropped}" if dropped is not None else ""
        )
        row.recovery_s = round(ping_s, 3)
        row.checks = {
            "broker RSS bounded": after["broker"] - before["broker"] <= _broker_bound_mib(sizes),
            "others still served": row.answered == 20,
        }
    return row


def _broker_bound_mib(sizes: Sizes) -> float:
    """What the broker may hold for the slow consumers: each one's in-flight and queued bytes
    (broker.py), two answers more, and some slack; unbounded, it would be every answer."""
    from hearth_gateway.broker import INFLIGHT_BYTES, QUEUED_BYTES

    per_client = INFLIGHT_BYTES + QUEUED_BYTES + 2 * SLOW_ANSWER
    return (sizes.slow_clients * per_client) / MIB + SLOW_CONSUMER_SLACK_MIB


def _packet(kind: int, body: bytes) -> bytes:
    length = bytearray()
    n = len(body)
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([kind]) + bytes(length) + body


def _str(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def _connect(client_id: str) -> bytes:
    # MQTT 5 CONNECT: protocol name, level 5, clean start, keepalive 0, no properties.
    return _packet(0x10, _str("MQTT") + bytes([5, 0x02, 0, 0, 0]) + _str(client_id))


def _subscribe(topic: str) -> bytes:
    return _packet(0x82, (1).to_bytes(2, "big") + b"\x00" + _str(topic) + b"\x01")


def _publish(topic: str, payload: bytes, response_topic: str, packet_id: int) -> bytes:
    props = b"\x08" + _str(response_topic) + b"\x09" + _str(packet_id.to_bytes(4, "big"))
    props_len = _packet(0, props)[1:]  # the variable byte integer, then the properties
    return _packet(
        0x32, _str(topic) + (packet_id % 65535 + 1).to_bytes(2, "big") + props_len + payload
    )


# --- the suite -------------------------------------------------------------------------------

SCENARIOS = (
    "broker-kill",
    "gateway-kill",
    "restart-storm",
    "disk-full",
    "partition",
    "fuzz",
    "slow-consumers",
)


def run_suite(tmp: Path, sizes: Sizes, only: Sequence[str]) -> Outcome:
    module_path = ensure_examples("wasm/echo.wasm") / "wasm" / "echo.wasm"
    module = module_path.read_bytes()
    plan: list[tuple[str, Callable[[], Row | list[Row]]]] = [
        ("broker-kill", lambda: broker_kill(tmp, sizes, module)),
        ("gateway-kill", lambda: gateway_kill(tmp, sizes, module)),
        ("restart-storm", lambda: gateway_kill(tmp, sizes, module, cycles=sizes.storm_cycles)),
        ("disk-full", lambda: disk_full(tmp, sizes, module)),
        ("partition", lambda: [partition(tmp, sizes, module_path, p) for p in ("auto", "edge")]),
        ("fuzz", lambda: fuzz(tmp, sizes, module)),
        ("slow-consumers", lambda: slow_consumers(tmp, sizes, module)),
    ]
    rows: list[Row] = []
    for name, scenario in plan:
        if only and name not in only:
            continue
        log.info("scenario %s", name)
        started = time.monotonic()
        try:
            result = scenario()
        except Exception as exc:  # a scenario that breaks is a failed row, not a lost suite
            log.exception("scenario %s failed", name)
            result = Row(name, checks={f"ran ({type(exc).__name__}: {exc})": False})
        for row in result if isinstance(result, list) else [result]:
            row.note = (row.note + f"; {time.monotonic() - started:.0f} s").lstrip("; ")
            rows.append(row)
    figures: dict[str, Any] = {row.fault: row.figures() for row in rows}
    figures["ok"] = all(row.ok or row.skipped for row in rows)
    figures["failed_checks"] = [
        f"{row.fault}: {check}" for row in rows for check, ok in row.checks.items() if not ok
    ]
    return Outcome(rows, figures)


def report(outcome: Outcome) -> None:
    table: list[list[object]] = []
    for row in outcome.rows:
        if row.skipped:
            table.append([row.fault, "-", "-", "-", "-", f"skipped: {row.skipped}", "-", "-"])
            continue
        errors = ", ".join(f"{k} {v}" for k, v in sorted(row.errors.items())) or "none"
        rss = " ".join(f"{k[0]} {a:.0f}>{b:.0f}" for k, (a, b) in row.rss_mib.items())
        recovery = "-" if row.recovery_s is None else f"{row.recovery_s:.2f} s"
        table.append(
            [row.fault, row.injected, row.sent, row.lost, row.twice, errors, recovery, rss]
        )
    print_table(
        [
            "fault",
            "injected",
            "jobs sent",
            "lost",
            "twice",
            "errors by code",
            "recovery",
            "RSS MiB (daemon workers broker)",
        ],
        table,
    )
    for row in outcome.rows:
        where = ", ".join(f"{k} {v}" for k, v in sorted(row.where.items()))
        print(
            f"- {row.fault}: {'ok' if row.ok else 'SKIPPED' if row.skipped else 'FAILED'}"
            + (f"; ran {where}" if where else "")
            + (f"; {row.note}" if row.note else "")
        )
        for check, ok in row.checks.items():
            print(f"    {'ok  ' if ok else 'FAIL'} {check}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_device"]:
        return _device(args[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="the bounded form CI runs")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=[])
    parser.add_argument("-v", "--verbose", action="store_true")
    opts = parser.parse_args(args)
    setup_logging(opts.verbose)
    sizes = QUICK if opts.quick else FULL
    outcome: list[Outcome] = []

    def run(tmp: Path) -> Outcome:
        outcome.append(run_suite(tmp, sizes, opts.only))
        return outcome[0]

    rc = run_and_report(run, opts.json, report)
    return rc or (0 if outcome and outcome[0].figures["ok"] else 1)


if __name__ == "__main__":
    sys.exit(main())
