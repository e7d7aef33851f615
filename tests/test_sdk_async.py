"""The SDK's async path: a call in flight is a pending reply, completed by the MQTT callback or
by its deadline, not a thread that waits; only a run on this device takes one."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import hearth
from conftest import Broker
from hearth.protocol import GatewayStatus, encode, status_topic
from hearth.transport import connect, make_client


@pytest.fixture
def silent_gateway(broker: Broker) -> Iterator[hearth.GatewayInfo]:
    """A gateway that says it is online (its retained status) and never answers anything."""
    gateway_id = f"gw-silent-{uuid.uuid4().hex[:8]}"
    announcer = make_client(f"{gateway_id}-status")
    connect(announcer, broker.address)
    online = encode(GatewayStatus(gateway_id=gateway_id, state="online"))
    announcer.publish(status_topic(gateway_id), online, qos=1, retain=True).wait_for_publish(5)
    try:
        yield hearth.GatewayInfo(gateway_id=gateway_id, broker=broker.address)
    finally:
        announcer.publish(status_topic(gateway_id), b"", qos=1, retain=True).wait_for_publish(5)
        announcer.disconnect()
        announcer.loop_stop()


def test_async_calls_in_flight_hold_no_thread_and_fall_back_when_overdue(
    silent_gateway: hearth.GatewayInfo, wasm: dict[str, Path]
) -> None:
    with hearth.Client(silent_gateway, placement="auto", timeout_s=1.5, retries=1) as client:
        assert client.gateway_reachable()
        before = {t.name for t in threading.enumerate()}
        futures = [client.run_wasm_async(wasm["echo"], stdin=str(i).encode()) for i in range(20)]
        in_flight = {t.name for t in threading.enumerate()} - before
        # 20 calls sent and unanswered: the connection's one deadline thread, nothing per call.
        assert in_flight <= {"hearth-deadlines"}, in_flight
        assert not any(f.done() for f in futures)
        runs = [f.result(timeout=30) for f in futures]
    assert sorted(r.stdout for r in runs) == sorted(str(i).encode() for i in range(20))
    assert {r.where for r in runs} == {"local"}
    # The reason says what happened: who did not answer, how long it waited, how often.
    assert {r.reason for r in runs} == {
        f"fallback: gateway timed out: no answer from gateway {silent_gateway.gateway_id} "
        "within 1.5 s (2 attempts under one job id)"
    }
    assert client.stats.retries == 20  # each one retried once under its job id, then ran here
    assert client.stats.fallbacks == 20


def test_an_async_call_reports_its_failure_through_the_future(wasm: dict[str, Path]) -> None:
    with hearth.Client("127.0.0.1:1", timeout_s=0.5) as client:
        unreachable = client.run_wasm_async(wasm["echo"], where="edge")
        assert isinstance(unreachable.exception(timeout=10), hearth.GatewayUnavailable)
        missing = client.run_wasm_async(wasm["echo"].with_name("missing.wasm"), where="local")
        assert isinstance(missing.exception(timeout=10), FileNotFoundError)


def test_a_blocking_call_runs_here_on_the_callers_thread(wasm: dict[str, Path]) -> None:
    with hearth.Client("127.0.0.1:1", placement="local") as client:
        run = client.run_wasm(wasm["echo"], stdin=b"here")
        assert run.stdout == b"here"
        assert not any(t.name.startswith("hearth-local") for t in threading.enumerate())
