"""What persistent tasks cost: memory per idle task, restore time, event-to-action latency.

One run, all on 127.0.0.1: one Mosquitto (the gateway's own config, TCP_NODELAY on) and one
``hearth-gateway`` subprocess using it, with a policy that allows thousands of tasks. In order:

1. latency with no other task: an "automation" (``counter.wasm``, woken by
   ``bench/motion/hall``, publishing to ``bench/lights/hall/set``) against the raw MQTT echo and
   the SDK's ping; a plain paho client publishes the sensor message at QoS 1 and waits for the
   light message. N round trips per series after a warm-up, interleaved in blocks. The
   automation is then cancelled;
2. memory: the daemon's RSS (VmRSS of the ``hearth_gateway.cli run`` process; RssAnon too) with
   0 tasks, then after installing T idle tasks (``counter.wasm``, each on a trigger topic of
   its own that nothing publishes to), and the workers' RSS, which should not move: a task is
   not resident between events. The module is uploaded once (by step 1); installs send its
   hash. Also the install rate (sequential installs by one device);
3. restart: SIGTERM, then a new daemon on the same state dir. The "restored N persistent tasks
   in X s" figure from its log (target: under 2 s), and the wall time from starting the process
   to its retained status saying online and to its first answered ping. The count restored
   must equal T;
4. latency again, with the T idle tasks in place (the automation is installed anew).

    .venv/bin/python benchmarks/tasks.py                 # tables
    .venv/bin/python benchmarks/tasks.py --json          # one JSON line on stdout
    .venv/bin/python benchmarks/tasks.py --tasks 200 --n 300
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from _common import (
    LOOPBACK,
    EchoRequester,
    EchoResponderProcess,
    GatewayProcess,
    Mosquitto,
    Summary,
    child_pids,
    ensure_examples,
    print_table,
    proc_cmdline,
    proc_memory_bytes,
    run_and_report,
    setup_logging,
    subscribe_and_wait,
    tree_cpu_s,
    verdict,
)
from hearth import Client
from hearth.errors import GatewayUnavailable, HearthError
from hearth.protocol import (
    Ping,
    Pong,
    TaskInfo,
    decode_reply,
    decode_status,
    encode,
    reply_topic,
    request_topic,
    status_topic,
)
from hearth.transport import BrokerAddress, make_client, publish_properties

log = logging.getLogger("bench.tasks")

DEFAULT_TASKS = 1000
DEFAULT_N = 1000
RESTORE_TARGET_S = 2.0  # for 1000 tasks
WARMUP = 50  # discarded round trips per series before measuring
ROUNDS = 4  # each series is measured in this many interleaved blocks
TIMEOUT_S = 10.0  # one round trip or request; a stuck run fails instead of hanging
SETTLE_S = 1.0  # before reading memory figures
WORKER_SETTLE_AGE_S = 20.0  # see wait_workers_settled
ONLINE_TIMEOUT_S = 120.0  # for the restarted gateway
POLICY_MAX_TASKS = 5000

GATEWAY_ID = "bench"
MODULE = "counter.wasm"
SENSOR_TOPIC = "bench/motion/hall"
LIGHT_TOPIC = "bench/lights/hall/set"
SENSOR_PAYLOAD = b"motion"
ECHO_TOPIC = "bench/echo/q1"
WATCHER_ID = "bench-watch"
OWNER_ID = "bench-auto"  # owns the automation
IDLE_OWNER_ID = "bench-idle"  # owns the idle tasks

_RESTORED_RE = re.compile(r"restored (\d+) persistent tasks in ([0-9.]+) s")
_READY_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* gateway \S+ ready:", re.M)

Figures = dict[str, float | int | bool]


def ensure_task_module() -> Path:
    """build/examples/tasks/counter.wasm, building the examples first if it is missing."""
    return ensure_examples(f"tasks/{MODULE}") / "tasks" / MODULE


# -- the gateway's processes ----------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    daemon_rss: int
    daemon_anon: int
    workers_rss: tuple[int, ...]

    @property
    def workers_total(self) -> int:
        return sum(self.workers_rss)


def runs_module(pid: int, module: str) -> bool:
    """Whether ``pid`` is ``python -m MODULE ...`` (the wrapper's argv names its child's too)."""
    return proc_cmdline(pid)[1:3] == ["-m", module]


def daemon_pid(gateway: GatewayProcess) -> int:
    """The ``hearth_gateway.cli run`` process: the child of the ``_pdeathsig`` wrapper that
    GatewayProcess starts (or that process itself, were it started directly)."""
    root = gateway.pid
    if root is None:
        raise RuntimeError("the gateway is not running")
    for pid in [root, *child_pids(root)]:
        if runs_module(pid, "hearth_gateway.cli"):
            return pid
    raise RuntimeError(f"no hearth_gateway.cli process under pid {root}")


def process_age_s(pid: int) -> float:
    """Seconds since ``pid`` started (0.0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return 0.0
    return uptime - int(stat[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks


def worker_pids(gateway: GatewayProcess) -> list[int]:
    return [p for p in child_pids(daemon_pid(gateway)) if runs_module(p, "hearth_gateway.worker")]


def wait_workers_settled(gateway: GatewayProcess) -> None:
    """An idle worker's RSS grows by about 0.4 MiB on its own, at about 9 and 15 s after it
    started, with no job sent to it (seen with the worker's own threads, not with tasks); so the
    workers' figures before and after the installs are taken when they are older than that."""
    ages = [process_age_s(p) for p in worker_pids(gateway)]
    wait = max(0.0, WORKER_SETTLE_AGE_S - min(ages, default=WORKER_SETTLE_AGE_S))
    if wait:
        log.info("waiting %.0f s for the workers' own start-up growth to pass", wait)
        time.sleep(wait)


def memory(gateway: GatewayProcess) -> Memory:
    """After SETTLE_S, so that the housekeeping tick and any replies in flight are done."""
    time.sleep(SETTLE_S)
    pid = daemon_pid(gateway)
    workers = worker_pids(gateway)
    if not workers:
        raise RuntimeError(f"no hearth_gateway.worker process under the daemon (pid {pid})")
    rss = proc_memory_bytes(pid, "VmRSS")
    anon = proc_memory_bytes(pid, "RssAnon")
    if rss is None or anon is None:
        raise RuntimeError(f"gateway daemon pid {pid} is gone")
    result = Memory(rss, anon, tuple(proc_memory_bytes(w, "VmRSS") or 0 for w in workers))
    log.debug(
        "daemon pid %d: VmRSS %d, RssAnon %d; workers %s: VmRSS %s",
        pid,
        rss,
        anon,
        workers,
        result.workers_rss,
    )
    return result


class OnlineWatcher:
    """Sees a (re)started gateway come up: when its retained status turns online (with a
    ``started_at`` after ``arm``), it sends a ping at once and notes when the pong arrives. One
    paho client, connected before the gateway is started, so nothing here is polled."""

    def __init__(self, address: BrokerAddress, gateway_id: str) -> None:
        self._gateway_id = gateway_id
        self._status_topic = status_topic(gateway_id)
        self._reply_topic = reply_topic(WATCHER_ID)
        self._lock = threading.Lock()
        self._armed_at = float(
            "inf"
        )  # wall clock: statuses of gateways started earlier don't count
        self._correlation = b""
        self.status_at: float | None = None  # perf_counter
        self.pong_at: float | None = None
        self._done = threading.Event()
        self._client = make_client(f"{WATCHER_ID}-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._message
        subscribe_and_wait(
            self._client, address, [(self._status_topic, 1), (self._reply_topic, 1)], TIMEOUT_S
        )

    def arm(self) -> None:
        with self._lock:
            self._armed_at = time.time()
            self._correlation = uuid.uuid4().bytes
            self.status_at = self.pong_at = None
            self._done.clear()

    def _message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        try:
            if msg.topic == self._status_topic:
                status = decode_status(msg.payload)
                with self._lock:
                    fresh = status.state == "online" and status.started_at >= self._armed_at
                    if not fresh or self.status_at is not None:
                        return
                    self.status_at = now
                    correlation = self._correlation
                client.publish(
                    request_topic(self._gateway_id, WATCHER_ID),
                    encode(Ping()),
                    qos=1,
                    properties=publish_properties(self._reply_topic, correlation),
                )
            elif getattr(msg.properties, "CorrelationData", None) == self._correlation and (
                isinstance(decode_reply(msg.payload), Pong)
            ):
                self.pong_at = now
                self._done.set()
        except HearthError:
            log.warning("watcher: undecodable message on %s", msg.topic)

    def wait(self, timeout_s: float) -> None:
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"the restarted gateway did not answer a ping in {timeout_s} s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# -- event-to-action round trips --------------------------------------------------------------


class AutomationProbe:
    """A plain MQTT client playing sensor and light: publishes on the sensor topic at QoS 1 and
    waits for the automation's publish on the light topic. counter.wasm publishes its running
    count, so each answer is checked to be the one this event caused."""

    def __init__(self, address: BrokerAddress, *, timeout_s: float = TIMEOUT_S) -> None:
        self._timeout_s = timeout_s
        self._answers: queue.Queue[bytes] = queue.Queue()
        self._expected = 0
        self._client = make_client(f"bench-sensor-{uuid.uuid4().hex[:8]}")
        self._client.on_message = lambda _c, _u, msg: self._answers.put(bytes(msg.payload))
        subscribe_and_wait(self._client, address, [(LIGHT_TOPIC, 1)], timeout_s)

    def reset(self) -> None:
        """A newly installed automation counts from 1 again."""
        self._expected = 0

    def call(self) -> None:
        self._expected += 1
        self._client.publish(SENSOR_TOPIC, SENSOR_PAYLOAD, qos=1)
        try:
            answer = self._answers.get(timeout=self._timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no message on {LIGHT_TOPIC} within {self._timeout_s} s") from None
        if answer != str(self._expected).encode():
            raise RuntimeError(f"expected {self._expected} on {LIGHT_TOPIC}, got {answer!r}")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@dataclass
class Series:
    name: str
    call: Callable[[], object]
    samples_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0  # all of this benchmark's processes, over the measured calls


def measure(all_series: Sequence[Series], n: int) -> None:
    """Warm every series up, then time ``n`` calls of each, one after another, in ROUNDS
    blocks per series, the series taking turns block by block (drift hits them alike)."""
    for s in all_series:
        for _ in range(WARMUP):
            s.call()
    for r in range(ROUNDS):
        block = n // ROUNDS + (n % ROUNDS if r == ROUNDS - 1 else 0)
        for s in all_series:
            call, samples = s.call, s.samples_ms
            cpu_before = tree_cpu_s()
            for _ in range(block):
                started = time.perf_counter()
                call()
                samples.append((time.perf_counter() - started) * 1e3)
            s.cpu_s += tree_cpu_s() - cpu_before


def latency(
    probe: AutomationProbe, echo: EchoRequester, owner: Client, n: int
) -> dict[str, Summary | float]:
    """task, echo and ping round trips; returns their summaries and CPU ms per round trip."""
    all_series = [
        Series("task", probe.call),
        Series("echo", lambda: echo.call(SENSOR_PAYLOAD)),
        Series("ping", owner.ping),
    ]
    measure(all_series, n)
    out: dict[str, Summary | float] = {}
    for s in all_series:
        out[s.name] = Summary.of(s.samples_ms)
        out[f"{s.name}_cpu"] = s.cpu_s * 1e3 / max(1, len(s.samples_ms))
    return out


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    tasks: int
    n: int
    workers: int | None


@dataclass
class Outcome:
    figures: Figures
    latency: dict[str, dict[str, Summary | float]]  # "empty" / "loaded" -> latency()
    memory: dict[str, Memory]


def install_automation(owner: Client, module: Path, probe: AutomationProbe) -> TaskInfo:
    info = owner.install_task(
        module,
        "hall-light",
        on=[SENSOR_TOPIC],
        may_publish=[LIGHT_TOPIC],
        config={"out_topic": LIGHT_TOPIC},
    )
    probe.reset()
    return info


def install_idle(client: Client, module: Path, count: int) -> list[float]:
    """``count`` idle tasks, one after another; returns each install's round trip in ms."""
    samples: list[float] = []
    for i in range(count):
        started = time.perf_counter()
        client.install_task(
            module,
            f"idle-{i}",
            on=[f"bench/idle/{i}/in"],
            may_publish=[f"bench/idle/{i}/out"],
            config={"out_topic": f"bench/idle/{i}/out"},
        )
        samples.append((time.perf_counter() - started) * 1e3)
        if (i + 1) % 250 == 0:
            log.info("installed %d/%d idle tasks", i + 1, count)
    return samples


def wait_usable(client: Client, timeout_s: float) -> None:
    """Until the client's connection sees the (restarted) gateway online."""
    deadline = time.monotonic() + timeout_s
    while not client.gateway_reachable():
        if time.monotonic() > deadline:
            raise GatewayUnavailable(f"{client.client_id}: gateway not online in {timeout_s} s")
        time.sleep(0.05)


def log_time(stamp: str) -> float:
    """A gateway log line's asctime (local time, ms) as unix seconds."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass(frozen=True)
class Startup:
    restored: int
    restore_s: float  # as the gateway logs it
    status_online_s: float  # process start to its retained status saying online
    pong_s: float  # process start to the first answered ping
    ready_log_s: float  # process start to its "ready" log line
    stop_s: float = 0.0  # of the gateway before it (a restart): SIGTERM to exit


def timed_start(gateway: GatewayProcess, watcher: OnlineWatcher) -> Startup:
    """Start the gateway (stopped, or never started) and time it: the watcher's view of its
    status and first ping, and the restore and ready lines of this start's log."""
    offset = gateway.log_path.stat().st_size if gateway.log_path.exists() else 0
    watcher.arm()
    spawned_wall, spawned = time.time(), time.perf_counter()
    gateway.start(timeout_s=ONLINE_TIMEOUT_S)
    watcher.wait(ONLINE_TIMEOUT_S)
    assert watcher.status_at is not None
    assert watcher.pong_at is not None
    with gateway.log_path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    restored = _RESTORED_RE.search(text)
    ready = _READY_RE.search(text)
    if restored is None or ready is None:
        raise RuntimeError("the gateway did not log its restore and ready lines")
    return Startup(
        restored=int(restored.group(1)),
        restore_s=float(restored.group(2)),
        status_online_s=watcher.status_at - spawned,
        pong_s=watcher.pong_at - spawned,
        ready_log_s=log_time(ready.group(1)) - spawned_wall,
    )


def restart(gateway: GatewayProcess, watcher: OnlineWatcher) -> Startup:
    began = time.perf_counter()
    gateway.close()
    stop_s = time.perf_counter() - began
    return dataclasses.replace(timed_start(gateway, watcher), stop_s=stop_s)


def run(opts: Options, work_dir: Path) -> Outcome:
    module = ensure_task_module()
    policy = work_dir / "tasks-policy.toml"
    limit = max(POLICY_MAX_TASKS, opts.tasks + 1)
    policy.write_text(f"[tasks]\nmax_tasks_per_client = {limit}\nmax_tasks = {limit}\n")
    figures: Figures = {}
    mem: dict[str, Memory] = {}
    lat: dict[str, dict[str, Summary | float]] = {}
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(work_dir))
        watcher = OnlineWatcher(broker.address, GATEWAY_ID)
        stack.callback(watcher.close)
        gateway = GatewayProcess(
            broker.address,
            work_dir,
            gateway_id=GATEWAY_ID,
            workers=opts.workers,
            extra_args=["--policy", str(policy)],
        )
        stack.callback(gateway.close)  # idempotent: also stops the restarted one
        fresh = timed_start(gateway, watcher)
        mem["start"] = memory(gateway)
        stack.enter_context(EchoResponderProcess(broker.address, work_dir, [(ECHO_TOPIC, 1)]))
        echo = stack.enter_context(
            EchoRequester(broker.address, ECHO_TOPIC, 1, timeout_s=TIMEOUT_S)
        )
        probe = AutomationProbe(broker.address)
        stack.callback(probe.close)
        gateway_arg = f"{LOOPBACK}:{broker.address.port}"
        owner = stack.enter_context(
            Client(gateway=gateway_arg, client_id=OWNER_ID, placement="edge", timeout_s=TIMEOUT_S)
        )
        # No retries: an install that timed out may have happened, and a retry would add a task.
        idle = stack.enter_context(
            Client(
                gateway=gateway_arg,
                client_id=IDLE_OWNER_ID,
                placement="edge",
                timeout_s=TIMEOUT_S,
                retries=0,
            )
        )

        # 1. Latency with no other task.
        automation = install_automation(owner, module, probe)
        log.info("automation %s installed; measuring with no other task", automation.task_id)
        lat["empty"] = latency(probe, echo, owner, opts.n)
        owner.task(automation.task_id, "cancel")
        if owner.tasks():
            raise RuntimeError("the automation is still there after its cancel")

        # 2. Memory per idle task.
        wait_workers_settled(gateway)
        mem["before"] = memory(gateway)
        log.info("installing %d idle tasks", opts.tasks)
        began = time.perf_counter()
        installs = install_idle(idle, module, opts.tasks)
        install_s = time.perf_counter() - began
        listed = idle.tasks()
        if len(listed) != opts.tasks:
            raise RuntimeError(f"{len(listed)} idle tasks listed, {opts.tasks} installed")
        mem["after"] = memory(gateway)

        # 3. Restart on the same state dir.
        log.info("restarting the gateway")
        rs = restart(gateway, watcher)
        log.info(
            "restored %d tasks in %.3f s; ping answered %.3f s after the process started",
            rs.restored,
            rs.restore_s,
            rs.pong_s,
        )
        mem["restored"] = memory(gateway)
        wait_usable(owner, TIMEOUT_S)
        wait_usable(idle, TIMEOUT_S)
        relisted = idle.tasks()
        if len(relisted) != opts.tasks:
            raise RuntimeError(f"{len(relisted)} idle tasks listed after the restart")

        # 4. Latency with the idle tasks in place.
        automation = install_automation(owner, module, probe)
        log.info(
            "automation %s installed; measuring with %d idle tasks", automation.task_id, opts.tasks
        )
        lat["loaded"] = latency(probe, echo, owner, opts.n)
        idle_events = sum(t.events + t.failures for t in idle.tasks())
        uploads = owner.stats.blob_uploads + idle.stats.blob_uploads
        idle_uploads = idle.stats.blob_uploads

    figures.update(
        tasks=opts.tasks,
        n=opts.n,
        cpus=os.cpu_count() or 1,
        gateway_workers=len(mem["start"].workers_rss),
        blob_uploads=uploads,
        idle_blob_uploads=idle_uploads,
        idle_events=idle_events,
    )
    figures.update(memory_figures(mem, opts.tasks))
    inst = Summary.of(installs)
    tenth = max(1, len(installs) // 10)
    figures.update(
        install_rate_per_s=opts.tasks / install_s,
        install_p50_ms=inst.p50,
        install_p99_ms=inst.p99,
        install_first_tenth_p50_ms=Summary.of(installs[:tenth]).p50,
        install_last_tenth_p50_ms=Summary.of(installs[-tenth:]).p50,
    )
    figures.update(
        stop_s=rs.stop_s,
        restored_tasks=rs.restored,
        restore_count_ok=rs.restored == opts.tasks,
        restore_s=rs.restore_s,
        restore_target_s=RESTORE_TARGET_S,
        restore_target_met=rs.restore_s < RESTORE_TARGET_S,
        restart_status_online_s=rs.status_online_s,
        restart_online_s=rs.pong_s,
        restart_ready_log_s=rs.ready_log_s,
        fresh_status_online_s=fresh.status_online_s,
        fresh_online_s=fresh.pong_s,
        restart_extra_s=rs.pong_s - fresh.pong_s,
    )
    for phase, prefix in (("empty", ""), ("loaded", "loaded_")):
        figures.update(latency_figures(lat[phase], prefix))
    figures["loaded_task_p50_delta_ms"] = float(figures["loaded_task_p50_ms"]) - float(
        figures["task_p50_ms"]
    )
    return Outcome(figures, lat, mem)


def memory_figures(mem: dict[str, Memory], tasks: int) -> Figures:
    out: Figures = {}
    for name, m in mem.items():
        out[f"rss_daemon_{name}_bytes"] = m.daemon_rss
        out[f"anon_daemon_{name}_bytes"] = m.daemon_anon
        out[f"rss_workers_{name}_bytes"] = m.workers_total
    before, after = mem["before"], mem["after"]
    out["rss_per_idle_task_bytes"] = (after.daemon_rss - before.daemon_rss) / tasks
    out["anon_per_idle_task_bytes"] = (after.daemon_anon - before.daemon_anon) / tasks
    out["rss_restored_per_task_bytes"] = (
        mem["restored"].daemon_rss - mem["start"].daemon_rss
    ) / tasks
    out["rss_workers_growth_bytes"] = after.workers_total - before.workers_total
    return out


def latency_figures(lat: dict[str, Summary | float], prefix: str) -> Figures:
    out: Figures = {}
    for name in ("task", "echo", "ping"):
        s = lat[name]
        cpu = lat[f"{name}_cpu"]
        assert isinstance(s, Summary)
        assert isinstance(cpu, float)
        out[f"{prefix}{name}_p50_ms"] = s.p50
        out[f"{prefix}{name}_p99_ms"] = s.p99
        out[f"{prefix}{name}_cpu_ms"] = cpu
    task, echo = lat["task"], lat["echo"]
    assert isinstance(task, Summary)
    assert isinstance(echo, Summary)
    out[f"{prefix}ratio_p50"] = task.p50 / echo.p50
    out[f"{prefix}ratio_p99"] = task.p99 / echo.p99
    return out


def mib(value: float) -> float:
    return value / (1 << 20)


def print_report(outcome: Outcome) -> None:
    f, mem = outcome.figures, outcome.memory
    tasks = int(f["tasks"])
    labels = {
        "start": "fresh start, 0 tasks",
        "before": "0 tasks (after the automation ran and went)",
        "after": f"{tasks} idle tasks installed",
        "restored": f"{tasks} idle tasks restored",
    }
    print_table(
        ["gateway", "daemon VmRSS MiB", "daemon RssAnon MiB", "workers VmRSS MiB"],
        [
            [labels[k], mib(m.daemon_rss), mib(m.daemon_anon), mib(m.workers_total)]
            for k, m in mem.items()
        ],
        title=f"Memory ({f['gateway_workers']} workers)",
    )
    print_table(
        ["figure", "value"],
        [
            ["daemon VmRSS per idle task (bytes)", f["rss_per_idle_task_bytes"]],
            ["daemon RssAnon per idle task (bytes)", f["anon_per_idle_task_bytes"]],
            [
                "daemon VmRSS per task, fresh start with them vs with none (bytes)",
                f["rss_restored_per_task_bytes"],
            ],
            ["workers' VmRSS growth (bytes)", f["rss_workers_growth_bytes"]],
            ["installs per second (sequential)", f["install_rate_per_s"]],
            ["install p50 / p99 (ms)", f"{f['install_p50_ms']:.3f} / {f['install_p99_ms']:.3f}"],
            [
                "install p50, first / last tenth (ms)",
                f"{f['install_first_tenth_p50_ms']:.3f} / {f['install_last_tenth_p50_ms']:.3f}",
            ],
            ["module uploads (all installs)", f["blob_uploads"]],
            ["events the idle tasks handled", f["idle_events"]],
        ],
        title=f"{tasks} idle tasks",
    )
    print_table(
        ["figure", "seconds"],
        [
            ["SIGTERM to exit", f["stop_s"]],
            [f"restore ({f['restored_tasks']} tasks, the gateway's log)", f["restore_s"]],
            ["start to retained status online", f["restart_status_online_s"]],
            ["start to first ping answered", f["restart_online_s"]],
            ["start to 'ready' log line", f["restart_ready_log_s"]],
            ["(first start, 0 tasks) start to status online", f["fresh_status_online_s"]],
            ["(first start, 0 tasks) start to first ping answered", f["fresh_online_s"]],
        ],
        title="Restart on the same state dir",
    )
    rows: list[list[object]] = []
    for phase, label in (("empty", "0"), ("loaded", str(tasks))):
        for name in ("task", "echo", "ping"):
            s = outcome.latency[phase][name]
            cpu = outcome.latency[phase][f"{name}_cpu"]
            assert isinstance(s, Summary)
            rows.append([label, name, s.n, s.p50, s.p90, s.p99, s.mean, s.max, cpu])
    print_table(
        ["idle", "series", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "max ms", "CPU ms"],
        rows,
        title="Round trips, QoS 1 (task: sensor message to the automation's light message; "
        "echo: raw MQTT request/response; ping: the SDK's ping to the gateway; CPU: all "
        "processes, per round trip)",
    )
    restore = float(f["restore_s"])
    print_table(
        ["figure", "value", "target", "verdict"],
        [
            ["task/echo p50, 0 idle", f["ratio_p50"], "-", "-"],
            ["task/echo p99, 0 idle", f["ratio_p99"], "-", "-"],
            [f"task/echo p50, {tasks} idle", f["loaded_ratio_p50"], "-", "-"],
            [f"task/echo p99, {tasks} idle", f["loaded_ratio_p99"], "-", "-"],
            [
                f"restore s ({tasks} tasks)",
                restore,
                f"< {RESTORE_TARGET_S}",
                verdict(restore, RESTORE_TARGET_S, at_most=True),
            ],
            [
                "tasks restored",
                f["restored_tasks"],
                f"= {tasks}",
                "PASS" if f["restore_count_ok"] else "MISS",
            ],
        ],
        title="Targets",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument(
        "--tasks", type=int, default=DEFAULT_TASKS, help=f"idle tasks (default {DEFAULT_TASKS})"
    )
    parser.add_argument(
        "--n", type=int, default=DEFAULT_N, help=f"round trips per series (default {DEFAULT_N})"
    )
    parser.add_argument("--workers", type=int, help="gateway worker processes (default: its own)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    if args.n < ROUNDS:
        parser.error(f"--n must be at least {ROUNDS}")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    setup_logging(args.verbose)
    opts = Options(tasks=args.tasks, n=args.n, workers=args.workers)
    return run_and_report(lambda tmp: run(opts, tmp), args.json, print_report)


if __name__ == "__main__":
    raise SystemExit(main())
