"""placement="hedge": a call runs on the device and on the gateway at once, and the first answer
wins (docs/migration.md, "Hedging"). Against a real gateway on 127.0.0.1."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import GatewayProcess


def test_a_hedged_call_answers_from_either_side_with_the_same_result(
    gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    with gateway.client(placement="hedge") as client:
        run = client.run_wasm(wasm["echo"], b"hedged", ["a", "b"])
        assert run.stdout == b"hedgeda b\n"
        assert run.reason.startswith("hedge: ")
        assert run.where in ("edge", "local")
        assert client.stats.hedged == 1
        future = client.run_wasm_async(wasm["echo"], b"async", [])
        assert future.result(30).stdout == b"async"
        assert client.stats.hedged == 2


def test_a_stalled_gateway_does_not_hold_a_hedged_call_up(
    gateway: GatewayProcess, wasm: dict[str, Path]
) -> None:
    pid = gateway.daemon_pid()
    with gateway.client(placement="hedge") as client:
        client.run_wasm(wasm["echo"], b"warm", [])  # the module is on both sides now
        os.kill(pid, signal.SIGSTOP)
        try:
            run = client.run_wasm(wasm["echo"], b"while the gateway is stopped", [])
        finally:
            os.kill(pid, signal.SIGCONT)
        assert run.stdout == b"while the gateway is stopped"
        assert run.where == "local"
        assert run.reason == "hedge: this device answered first"


def test_hedge_runs_here_alone_when_no_gateway_answers(wasm: dict[str, Path]) -> None:
    from hearth import Client

    with Client("127.0.0.1:1", placement="hedge", timeout_s=2) as client:
        run = client.run_wasm(wasm["echo"], b"alone", [])
    assert run.where == "local"
    assert run.stdout == b"alone"
