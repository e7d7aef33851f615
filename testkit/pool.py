"""A pool of cloud-tier gateways behind one broker, a home gateway using the pool as its
upstream, and a device streaming public jobs through it (tests/test_pool.py and
benchmarks/pool.py share it).

The home gateway has no ``wasm`` runner, so placement sends every public WebAssembly job to
its upstream: the pool. The device is raw MQTT 5 (paho), so its own cost per job stays small
next to the gateways': it keeps ``window`` jobs in flight, and records every answer each job
id gets (a job answered twice with different results would show here).
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from hearth.protocol import (
    BlobChunk,
    BlobStored,
    Error,
    WasmJob,
    WasmResult,
    decode_reply,
    encode,
    reply_topic,
    request_topic,
)
from hearth.transport import BrokerAddress, connect, make_client, publish_properties
from testkit.gateway import GatewayProcess
from testkit.wait import wait_until

__all__ = ["PoolRig", "StreamReport", "stream_jobs"]


class PoolRig:
    """``members`` cloud-tier gateways in pool ``pool_id`` and one home gateway whose
    upstream is that pool, all on the broker at ``broker`` (a context manager; ``close()``
    is idempotent)."""

    def __init__(
        self,
        broker: BrokerAddress,
        work_dir: Path,
        members: int,
        *,
        supervised: bool = False,
        member_workers: int = 1,
        home_workers: int = 1,
    ) -> None:
        self.broker = broker
        tag = uuid.uuid4().hex[:6]
        self.pool_id = f"pool-{tag}"
        self.members = [
            GatewayProcess(
                broker,
                work_dir / f"member-{i}",
                gateway_id=f"cloud-{tag}-{i}",
                workers=member_workers,
                extra_args=("--tier", "cloud", "--pool", self.pool_id),
                supervised=supervised,
            )
            for i in range(members)
        ]
        config = work_dir / "home.toml"
        work_dir.mkdir(parents=True, exist_ok=True)
        # No wasm runner at home: every public WebAssembly job goes to the pool.
        config.write_text('runners = ["task"]\n')
        self.home = GatewayProcess(
            broker,
            work_dir / "home",
            gateway_id=f"home-{tag}",
            workers=home_workers,
            extra_args=(
                "--config",
                str(config),
                "--upstream",
                f"mqtt://{broker}",
                "--upstream-gateway-id",
                self.pool_id,
            ),
            supervised=supervised,
        )

    def start(self) -> PoolRig:
        try:
            for member in self.members:
                member.start()
            self.home.start()
            if not wait_until(lambda: self.home.snapshot().upstream_connected, 30.0, 0.05):
                raise TimeoutError(f"home gateway never saw pool {self.pool_id} online")
        except BaseException:
            self.close()
            raise
        return self

    def pids(self) -> list[int]:
        """The daemons' pids (each the root of its process tree: workers below it)."""
        return [g.proc.pid for g in [*self.members, self.home] if g.proc is not None]

    def close(self) -> None:
        for gateway in [self.home, *self.members]:
            gateway.close(grace_s=2.0)

    def __enter__(self) -> PoolRig:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass
class StreamReport:
    sent: int = 0
    answers: dict[str, list[bytes]] = field(default_factory=dict)  # job id -> stdouts
    errors: dict[str, str] = field(default_factory=dict)  # job id -> "code: message"
    ran_on: Counter[str] = field(default_factory=Counter)  # member -> first answers
    wrong: int = 0  # first answers whose output was not the job's own input echoed
    elapsed_s: float = 0.0

    @property
    def lost(self) -> int:
        return self.sent - len(self.answers)

    @property
    def answered_twice_differently(self) -> int:
        return sum(1 for outs in self.answers.values() if len(set(outs)) > 1)


class _Device:
    def __init__(self, broker: BrokerAddress, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self.client_id = f"dev-{uuid.uuid4().hex[:8]}"
        self._reply_topic = reply_topic(self.client_id)
        self._client = make_client(self.client_id)
        self._client.on_message = self._message
        self._lock = threading.Lock()
        self._waiters: dict[bytes, Callable[[Any], None]] = {}
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_: subscribed.set()
        connect(self._client, broker, on_connected=self._subscribe)
        subscribed.wait(5)

    def _subscribe(self) -> None:
        self._client.subscribe(self._reply_topic, qos=1)

    def _message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        correlation = bytes(getattr(msg.properties, "CorrelationData", b"") or b"")
        with self._lock:
            waiter = self._waiters.get(correlation)
        if waiter is not None:
            waiter(decode_reply(msg.payload))

    def send(self, message: Any, correlation: bytes, on_reply: Callable[[Any], None]) -> None:
        with self._lock:
            self._waiters[correlation] = on_reply
        self._client.publish(
            request_topic(self.gateway_id, self.client_id),
            encode(message),
            qos=1,
            properties=publish_properties(self._reply_topic, correlation),
        )

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def stream_jobs(
    broker: BrokerAddress,
    home_id: str,
    module: bytes,
    jobs: int,
    *,
    window: int = 32,
    timeout_s: float = 180.0,
    on_progress: Callable[[int], None] | None = None,
) -> StreamReport:
    """Upload ``module`` (an echo: stdout is stdin) to the home gateway as public, then send
    ``jobs`` public jobs, at most ``window`` unanswered at a time, and wait for every answer
    (until ``timeout_s``). ``on_progress(answered)`` runs on each first answer (from paho's
    thread: keep it short)."""
    report = StreamReport()
    device = _Device(broker, home_id)
    try:
        sha = hashlib.sha256(module).hexdigest()
        stored = threading.Event()
        device.send(
            BlobChunk(sha256=sha, size=len(module), offset=0, data=module, data_class="public"),
            b"upload",
            lambda reply: stored.set() if isinstance(reply, BlobStored) else None,
        )
        if not stored.wait(20):
            raise TimeoutError("the home gateway did not store the module")
        slots = threading.Semaphore(window)
        lock = threading.Lock()
        done = threading.Event()
        started = time.monotonic()

        def answered(job_id: str, expected: bytes, reply: Any) -> None:
            with lock:
                first = job_id not in report.answers and job_id not in report.errors
                if isinstance(reply, WasmResult):
                    report.answers.setdefault(job_id, []).append(bytes(reply.stdout))
                    if first:
                        report.ran_on[reply.timing.upstream or "home"] += 1
                        report.wrong += bytes(reply.stdout) != expected
                elif isinstance(reply, Error):
                    report.errors.setdefault(job_id, f"{reply.code}: {reply.message}")
                else:
                    return  # need_blob and the like never reach the device here
                count = len(report.answers) + len(report.errors)
            if first:
                slots.release()
                if on_progress is not None:
                    on_progress(count)
                if count >= jobs:
                    done.set()

        for i in range(jobs):
            if not slots.acquire(timeout=timeout_s):
                break
            job_id = f"j{i}"
            stdin = f"job {i} of {jobs}\n".encode()
            job = WasmJob(job_id=job_id, module=sha, stdin=stdin, data_class="public")
            device.send(job, job_id.encode(), functools.partial(answered, job_id, stdin))
            report.sent += 1
        done.wait(max(0.0, timeout_s - (time.monotonic() - started)))
        report.elapsed_s = time.monotonic() - started
        time.sleep(0.5)  # a late second answer to any job would arrive by now
    finally:
        device.close()
    return report
