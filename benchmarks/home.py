"""Motion to light through the home's own broker, on a LAN of two network namespaces.

The LAN: namespace "gw" holds the gateway box (``hearth-gateway`` with its managed Mosquitto on
the namespace's loopback); namespace "home" holds the home's broker (a second Mosquitto on
10.x.y.2:1883, as Home Assistant's add-on would be) and, as clients of it speaking MQTT 3.1.1
like zigbee2mqtt, a motion sensor and a light. A veth pair joins the two. The gateway runs
``zigbee_light.wasm`` as a task: ``home:zigbee2mqtt/hall_motion`` -> ``{"state":"ON"}`` on
``home:zigbee2mqtt/hall_light/set``, and OFF after ``off_after_s`` without motion.

Measured by a probe in the home namespace (sensor and light in one process, one clock): the
time from the sensor's publish (QoS 1) to the light's ON, N times, against a baseline in the
same run: a plain MQTT 3.1.1 relay in the gateway's namespace that republishes the sensor's
message to the light at once (the same two crossings of the link, with no gateway). Blocks of
the two series take turns. Then the time from the last motion to the light's OFF (the timeout
plus up to one timer period). Target: task p50 under 100 ms.

    sudo .venv/bin/python benchmarks/home.py            # a table
    sudo .venv/bin/python benchmarks/home.py --json     # one JSON object on stdout
    sudo .venv/bin/python benchmarks/home.py --n 400

Needs root (``ip netns``); everything stays inside the two namespaces it creates and deletes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from _common import (
    REPO_ROOT,
    Summary,
    ensure_examples,
    print_table,
    run_and_report,
    setup_logging,
    verdict,
)
from hearth.transport import BrokerAddress, set_nodelay
from hearth_gateway.status import read_snapshot
from testkit.home_broker import HomeBroker, HomeDevice

log = logging.getLogger("bench.home")

MOTION = "zigbee2mqtt/hall_motion"
LIGHT = "zigbee2mqtt/hall_light/set"
RAW_IN = "bench/raw/motion"
RAW_OUT = "bench/raw/light"
TARGET_P50_MS = 100.0
OFF_AFTER_S = 1.0
TICK_S = 0.2
BLOCK = 20
DEFAULT_N = 200


# --- the two namespaces --------------------------------------------------------------------


def _ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {result.stderr.strip()}")


@dataclass
class Lan:
    gw: str
    home: str
    gw_ip: str
    home_ip: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, ns: str, argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc


@contextlib.contextmanager
def lan() -> Iterator[Lan]:
    """Two namespaces and a veth pair created inside them (the host's interfaces and routes
    are never touched); at the end whatever runs in them is killed and they are deleted."""
    suffix = uuid.uuid4().hex[:6]
    subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    net = Lan(f"hearth-gw-{suffix}", f"hearth-home-{suffix}", f"{subnet}.1", f"{subnet}.2")
    created: list[str] = []
    try:
        for ns in (net.gw, net.home):
            _ip("netns", "add", ns)
            created.append(ns)
        gw_if, home_if = f"hg{suffix}", f"hh{suffix}"
        _ip(
            "-n",
            net.gw,
            "link",
            "add",
            gw_if,
            "type",
            "veth",
            "peer",
            "name",
            home_if,
            "netns",
            net.home,
        )  # fmt: skip - one ip(8) command, as typed
        _ip("-n", net.gw, "addr", "add", f"{net.gw_ip}/24", "dev", gw_if)
        _ip("-n", net.home, "addr", "add", f"{net.home_ip}/24", "dev", home_if)
        for ns, dev in ((net.gw, gw_if), (net.home, home_if), (net.gw, "lo"), (net.home, "lo")):
            _ip("-n", ns, "link", "set", dev, "up")
        yield net
    finally:
        for proc in net.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        for ns in created:
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], check=False)


# --- the probe (in the home namespace) and the relay (in the gateway's) --------------------


def _probe(broker: BrokerAddress, n: int) -> dict[str, Any]:
    light = HomeDevice(broker, f"light-{uuid.uuid4().hex[:6]}", subscribe=(LIGHT, RAW_OUT))
    sensor = HomeDevice(broker, f"sensor-{uuid.uuid4().hex[:6]}")
    task_ms: list[float] = []
    raw_ms: list[float] = []
    try:
        # Warm-up, until each path answers: the relay and the task's subscription may not be
        # in place yet, and the task's first event compiles its module in a worker.
        for topic, out in ((MOTION, LIGHT), (RAW_IN, RAW_OUT)):
            for attempt in range(60):
                sensor.publish(topic, '{"occupancy":true}')
                try:
                    light.expect(out, timeout_s=1.0)
                    break
                except TimeoutError:
                    if attempt == 59:
                        raise
        time.sleep(0.5)
        while not light.received.empty():  # late answers to the warm-up
            light.received.get()
        while len(task_ms) < n:
            for topic, out, series in ((MOTION, LIGHT, task_ms), (RAW_IN, RAW_OUT, raw_ms)):
                for _ in range(BLOCK):
                    time.sleep(0.02)
                    began = time.monotonic()
                    sensor.publish(topic, '{"occupancy":true,"battery":97}')
                    at, _payload = light.expect(out, timeout_s=10)
                    series.append((at - began) * 1000)
        last_motion = time.monotonic()  # a last motion, then quiet until the light goes off
        sensor.publish(MOTION, '{"occupancy":true}')
        light.expect(LIGHT, timeout_s=10)
        while True:
            at, payload = light.expect(LIGHT, timeout_s=OFF_AFTER_S * 10)
            if payload == b'{"state":"OFF"}':
                off_s = at - last_motion
                break
    finally:
        sensor.close()
        light.close()
    return {"task_ms": task_ms, "raw_ms": raw_ms, "off_s": off_s}


def _serve(broker: BrokerAddress) -> None:
    """The sensor and the light, steered line by line on stdin (for the restart phase):
    ``motion``; ``connected`` (waits for the sensor's reconnection); ``expect S`` and ``quiet
    S`` print the light's next payload within S seconds, or ``timeout``."""
    light = HomeDevice(broker, "hall-light-restarts", subscribe=(LIGHT,))
    sensor = HomeDevice(broker, "hall-sensor-restarts")
    try:
        for line in sys.stdin:
            verb, _, arg = line.strip().partition(" ")
            if verb == "motion":
                sensor.publish(MOTION, '{"occupancy":true}')
                answer = "sent"
            elif verb == "connected":
                answer = str(sensor.connected.wait(30) and light.connected.wait(30))
            else:
                try:
                    answer = light.expect(LIGHT, timeout_s=float(arg))[1].decode()
                except TimeoutError:
                    answer = "timeout"
            print(answer, flush=True)
    finally:
        sensor.close()
        light.close()


def _relay(broker: BrokerAddress) -> None:
    """Republish RAW_IN to RAW_OUT at once: the baseline, a gateway that does nothing."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-relay", protocol=mqtt.MQTTv311)
    client.on_connect = lambda c, *_: c.subscribe(RAW_IN, qos=1)
    client.on_message = lambda c, _u, m: c.publish(RAW_OUT, m.payload, qos=1)
    client.on_socket_open = set_nodelay
    client.connect(broker.host, broker.port)
    client.loop_forever()


# --- the run ---------------------------------------------------------------------------------


class _Steer:
    """The parent's end of ``--serve`` in the home namespace."""

    def __init__(self, net: Lan, broker: BrokerAddress) -> None:
        me = str(Path(__file__).resolve())
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", net.home, sys.executable, me, "--serve", str(broker)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        net.procs.append(self._proc)  # type: ignore[arg-type]  # killed with the rest

    def __call__(self, line: str) -> str:
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        return self._proc.stdout.readline().strip()


def _restarts(
    net: Lan, tmp: Path, home: HomeBroker, gateway: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """One motion after each of: nothing, the home broker SIGKILLed and restarted (before the
    gateway is back on it), the gateway SIGKILLed (the motion while it is down) and restarted.
    Each must switch the light on, then off after the timeout, and nothing else."""
    steer = _Steer(net, home.address)
    on = '{"state":"ON"}'
    off = '{"state":"OFF"}'
    seen: list[str] = []
    motions = 0

    def motion_then_light() -> None:
        nonlocal motions
        steer("motion")
        motions += 1
        # Before the ON, the home broker may repeat its last OFF (killed before it saved the
        # light's acknowledgement): at least once.
        while (heard := steer("expect 30")) not in (on, "timeout"):
            seen.append(heard)
        seen.append(heard)
        seen.append(steer("expect 10"))

    assert steer("connected") == "True"
    motion_then_light()
    home.kill()
    home.start()
    assert steer("connected") == "True"
    motion_then_light()
    gateway.kill()  # SIGKILL; its broker and workers follow it
    gateway.wait()
    steer("motion")
    motions += 1
    _start_gateway(net, tmp, home)
    # Everything until the light is quiet: at least once, a gateway killed between sending
    # an OFF and checkpointing it sends that OFF again.
    after: list[str] = []
    while on not in after and "timeout" not in after:
        after.append(steer("expect 30"))
    while after[-1] != "timeout":  # then its OFF, then quiet
        after.append(steer(f"expect {OFF_AFTER_S * 3}"))
    seen += after[:-1]
    lost = motions - seen.count(on)
    log.info("restarts: light saw %s", seen)
    return {"motions": motions, "on": seen.count(on), "off": seen.count(off), "lost": lost,
            "repeated_off": seen.count(off) - motions,
            "light_off_at_end": seen[-1:] == [off]}  # fmt: skip


@dataclass
class Outcome:
    task: Summary
    raw: Summary
    off_s: float
    figures: dict[str, Any]


def _start_gateway(net: Lan, tmp: Path, home: HomeBroker) -> tuple[Path, subprocess.Popen[bytes]]:
    state = tmp / "gateway" / "state"
    state.mkdir(parents=True, exist_ok=True)
    config = tmp / "gateway.toml"
    config.write_text(f'home_broker = "{home.url}"\nhome_broker_protocol = "3.1.1"\n')
    policy = tmp / "policy.toml"
    policy.write_text(
        '[tasks]\nhome_read = ["zigbee2mqtt/#"]\nhome_publish = ["zigbee2mqtt/+/set"]\n'
    )
    argv = [
        sys.executable,
        "-m",
        "hearth_gateway.cli",
        "run",
        "--gateway-id",
        "bench-home",
        "--state-dir",
        str(state),
        "--listen",
        "127.0.0.1:1883",
        "--config",
        str(config),
        "--policy",
        str(policy),
        "--workers",
        "2",
        "--no-mdns",
    ]  # fmt: skip - argv
    proc = net.spawn(net.gw, argv, tmp / "gateway.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {(tmp / 'gateway.log').read_text()[-2000:]}")
        snap = read_snapshot(state)
        if snap is not None and snap.state == "online" and snap.pid == proc.pid:
            return state, proc
        time.sleep(0.1)
    raise RuntimeError("gateway not online within 60 s")


def _install(state: Path, module: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_gateway.cli",
            "tasks",
            "install",
            str(module),
            "--name",
            "hall-light",
            "--on",
            f"home:{MOTION}",
            "--every",
            str(TICK_S),
            "--may-publish",
            f"home:{LIGHT}",
            "--set",
            f"light_topic=home:{LIGHT}",
            "--set",
            f"off_after_s={OFF_AFTER_S}",
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )  # fmt: skip - argv
    if result.returncode != 0:
        raise RuntimeError(f"task install: {result.stderr}")


def run(n: int, tmp: Path) -> Outcome:
    examples = ensure_examples("tasks/zigbee_light.wasm")
    with lan() as net, contextlib.ExitStack() as stack:
        home = HomeBroker(tmp, host=net.home_ip, port=1883, netns=net.home)
        stack.enter_context(home.start())
        state, gateway = _start_gateway(net, tmp, home)
        _install(state, examples / "tasks" / "zigbee_light.wasm")
        me = str(Path(__file__).resolve())
        net.spawn(net.gw, [sys.executable, me, "--relay", str(home.address)], tmp / "relay.log")
        probe = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                net.home,
                sys.executable,
                me,
                "--probe",
                str(home.address),
                "--n",
                str(n),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )  # fmt: skip - argv
        if probe.returncode != 0:
            raise RuntimeError(f"probe failed: {probe.stderr[-3000:]}")
        result = json.loads(probe.stdout)
        result["restarts"] = _restarts(net, tmp, home, gateway)
    task, raw = Summary.of(result["task_ms"]), Summary.of(result["raw_ms"])
    figures = {
        "n": task.n,
        "task_p50_ms": task.p50,
        "task_p90_ms": task.p90,
        "task_p99_ms": task.p99,
        "raw_p50_ms": raw.p50,
        "raw_p90_ms": raw.p90,
        "raw_p99_ms": raw.p99,
        "task_over_raw_p50": task.p50 / raw.p50 if raw.p50 else float("nan"),
        "off_after_last_motion_s": result["off_s"],
        "off_after_s": OFF_AFTER_S,
        "timer_s": TICK_S,
        "target_p50_ms": TARGET_P50_MS,
        "target_met": task.p50 <= TARGET_P50_MS,
        "restart_motions": result["restarts"]["motions"],
        "restart_motions_lost": result["restarts"]["lost"],
        "restart_repeated_off": result["restarts"]["repeated_off"],
        "restart_light_off_at_end": result["restarts"]["light_off_at_end"],
    }
    return Outcome(task, raw, result["off_s"], figures)


def report(outcome: Outcome) -> None:
    rows = [
        [
            "task on the gateway",
            outcome.task.n,
            outcome.task.p50,
            outcome.task.p90,
            outcome.task.p99,
            outcome.task.max,
        ],
        [
            "raw relay (baseline)",
            outcome.raw.n,
            outcome.raw.p50,
            outcome.raw.p90,
            outcome.raw.p99,
            outcome.raw.max,
        ],
    ]  # fmt: skip - a table
    print_table(
        ["motion -> light ON", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"],
        rows,
        title="Through the home broker (MQTT 3.1.1 sensor and light, another netns host)",
    )
    figures = outcome.figures
    print(
        f"task p50 / relay p50: {figures['task_over_raw_p50']:.2f}; target p50 <= "
        f"{TARGET_P50_MS:.0f} ms: {verdict(outcome.task.p50, TARGET_P50_MS, at_most=True)}"
    )
    print(
        f"light OFF {outcome.off_s:.2f} s after the last motion "
        f"(off_after_s {OFF_AFTER_S}, timer every {TICK_S} s)"
    )
    print(
        f"home broker SIGKILLed and restarted, then the gateway: {figures['restart_motions']} "
        f"motions, {figures['restart_motions_lost']} lost, light off at the end: "
        f"{figures['restart_light_off_at_end']} ({figures['restart_repeated_off']} OFF repeated: "
        "at least once)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="motions per series")
    parser.add_argument("--probe", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--relay", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(_probe(BrokerAddress.parse(args.probe), args.n)))
        return 0
    if args.serve:
        _serve(BrokerAddress.parse(args.serve))
        return 0
    if args.relay:
        _relay(BrokerAddress.parse(args.relay))
        return 0
    if os.geteuid() != 0:
        parser.error("needs root: it creates two network namespaces")
    setup_logging(args.verbose)
    return run_and_report(lambda tmp: run(args.n, tmp), args.json, report)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
