"""Hedging (placement="hedge"): does running a call on the device and the gateway at once hide
a gateway that stalls, and what does it cost?

A real gateway (its own Mosquitto, 2 workers) on 127.0.0.1 and this process as the device. The
gateway stalls 1 call in 20 for 200 ms: the benchmark stops the daemon (SIGSTOP) just before
such a call and lets it go on (SIGCONT) 200 ms later, the way a box stalls when something else
takes its CPU or its disk. The same calls, with the same stalls at the same indices, run with
``edge`` and with ``hedge`` placement, in blocks taken in turn. Figures: p50 and p99 latency of
each, the ratio of the p99s (target: hedge <= 0.5 x edge), and the CPU each costs per call, on
the device (this process: its local runs) and on the gateway (its whole process tree), so the
price of the duplicate work is in the same table.

    .venv/bin/python benchmarks/hedge.py            # table
    .venv/bin/python benchmarks/hedge.py --json     # one JSON line on stdout
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    GatewayProcess,
    Summary,
    ensure_examples,
    print_table,
    run_and_report,
    setup_logging,
    tree_cpu_s,
    verdict,
)
from hearth import Client
from hearth.errors import ErrorCode, JobError
from hearth.transport import BrokerAddress
from testkit.net import LOOPBACK, free_port

STALL_EVERY = 20
STALL_S = 0.2
TARGET_P99_RATIO = 0.5
# hedge: the loser is cancelled (both halves are migratable runs, hearth._hedge);
# hedge-nocancel: the loser runs to its end and its answer is dropped (Client.hedge_cancels).
MODES = ("edge", "hedge", "hedge-nocancel")


@dataclass
class Outcome:
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[list[object]] = field(default_factory=list)


def _stall(pid: int) -> threading.Timer:
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(STALL_S, os.kill, args=(pid, signal.SIGCONT))
    timer.start()
    return timer


def _series(
    client: Client, module: Path, stdin: bytes, mode: str, indices: range, pid: int
) -> tuple[list[float], float, float, int, int]:
    """Latencies (ms) of the calls at ``indices``, CPU s of this process and of the gateway's
    tree, how many the device answered first, and how many losers were cancelled (the others
    finished before their cancel took effect)."""
    latencies: list[float] = []
    losers = []
    local_wins = client.stats.hedge_local_wins
    client.hedge_cancels = mode != "hedge-nocancel"
    where = "edge" if mode == "edge" else "hedge"
    cpu_here, cpu_there = time.process_time(), tree_cpu_s(pid)
    for i in indices:
        timer = _stall(pid) if i % STALL_EVERY == STALL_EVERY - 1 else None
        started = time.perf_counter()
        run = client.run_wasm(module, stdin, ["edges"], where=where)
        latencies.append((time.perf_counter() - started) * 1e3)
        assert run.exit_code == 0
        if mode == "hedge":
            losers.append(client._hedger.losers[-1])
        if timer is not None:
            timer.join()  # the next call starts on a gateway that runs again
    # Let the losing halves of hedged calls end before their CPU is counted.
    cancelled = 0
    for loser in losers:
        try:
            loser.result(30)
        except JobError as exc:
            cancelled += exc.code is ErrorCode.CANCELLED
    time.sleep(0.3)
    cpu_here = time.process_time() - cpu_here
    cpu_there = tree_cpu_s(pid) - cpu_there
    wins = client.stats.hedge_local_wins - local_wins
    return latencies, cpu_here, cpu_there, wins, cancelled


def run(work: Path, n: int, block: int) -> Outcome:
    wasm = ensure_examples("wasm/imgfilter.wasm") / "wasm" / "imgfilter.wasm"
    stdin = _frame()
    listen = BrokerAddress(LOOPBACK, free_port())
    latencies: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [0.0, 0.0] for m in MODES}
    wins = cancelled = 0
    with (
        GatewayProcess(listen, work / "gw", managed=True, workers=2) as gateway,
        Client(gateway.address, timeout_s=20, max_workers=4) as client,
    ):
        pid = gateway.daemon_pid()
        for mode in MODES:  # warm-up: upload, compile, first runs on both sides
            client.hedge_cancels = mode != "hedge-nocancel"
            for _ in range(5):
                client.run_wasm(wasm, stdin, ["edges"], where="edge" if mode == "edge" else "hedge")
        for start in range(0, n, block):
            for mode in MODES:
                lat, here, there, won, stopped = _series(
                    client, wasm, stdin, mode, range(start, min(n, start + block)), pid
                )
                latencies[mode] += lat
                cpu[mode][0] += here
                cpu[mode][1] += there
                if mode == "hedge":
                    wins += won
                    cancelled += stopped
    out = Outcome()
    summaries = {m: Summary.of(latencies[m]) for m in MODES}
    for mode in MODES:
        s = summaries[mode]
        here, there = (c / max(1, s.n) * 1e3 for c in cpu[mode])
        out.rows.append([mode, s.n, s.p50, s.p99, s.max, here, there, here + there])
        out.figures[f"{mode}_p50_ms"] = s.p50
        out.figures[f"{mode}_p99_ms"] = s.p99
        out.figures[f"{mode}_cpu_device_ms_per_call"] = here
        out.figures[f"{mode}_cpu_gateway_ms_per_call"] = there
    ratio = summaries["hedge"].p99 / summaries["edge"].p99
    out.figures["p99_ratio_hedge_over_edge"] = ratio
    out.figures["p99_ratio_target"] = TARGET_P99_RATIO
    out.figures["p99_ratio_verdict"] = verdict(ratio, TARGET_P99_RATIO, at_most=True)
    out.figures["hedge_device_first"] = wins
    out.figures["hedge_losers_cancelled"] = cancelled
    nocancel = summaries["hedge-nocancel"].p99 / summaries["edge"].p99
    out.figures["p99_ratio_hedge_nocancel_over_edge"] = nocancel
    out.figures["calls_per_mode"] = n
    out.figures["stalls_per_mode"] = n // STALL_EVERY
    return out


def _frame() -> bytes:
    """A 160x120 PGM: a small camera frame for the edge filter."""
    width, height = 160, 120
    pixels = bytes((x * 7 + y * 13) % 256 for y in range(height) for x in range(width))
    return f"P5\n{width} {height}\n255\n".encode() + pixels


def report(out: Outcome) -> None:
    f = out.figures
    print_table(
        [
            "placement",
            "calls",
            "p50 ms",
            "p99 ms",
            "max ms",
            "device CPU ms",
            "gateway CPU ms",
            "total CPU ms",
        ],
        out.rows,
        title=f"A gateway that stalls 1 call in {STALL_EVERY} for {STALL_S * 1e3:.0f} ms "
        "(CPU per call)",
    )
    print_table(
        ["figure", "measured", "target", ""],
        [
            [
                "p99 hedge / p99 edge",
                f["p99_ratio_hedge_over_edge"],
                f"<= {TARGET_P99_RATIO}",
                f["p99_ratio_verdict"],
            ],
            [
                "p99 hedge-nocancel / p99 edge",
                f["p99_ratio_hedge_nocancel_over_edge"],
                "",
                "",
            ],
            ["hedged calls the device answered first", f["hedge_device_first"], "", ""],
            [
                "hedge losers cancelled (the rest had finished)",
                f["hedge_losers_cancelled"],
                "",
                "",
            ],
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument("--n", type=int, default=400, help="calls per placement (default 400)")
    parser.add_argument("--block", type=int, default=100, help="calls per block (default 100)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.n < STALL_EVERY or args.block < 1:
        parser.error(f"--n must be at least {STALL_EVERY}, --block at least 1")
    setup_logging(args.verbose)
    return run_and_report(lambda work: run(work, args.n, args.block), args.json, report)


if __name__ == "__main__":
    raise SystemExit(main())
