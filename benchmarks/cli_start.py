"""How soon a `hearth run` command starts its job: with the paired gateway's stored address
(no discovery), against a fresh mDNS discovery and against a gateway named by HOST:PORT.

One run, all on 127.0.0.1: a ``hearth-gateway`` with its managed Mosquitto, a device (TLS)
listener and mDNS bound to 127.0.0.1; a device paired with it (a configuration directory of its
own). Then, interleaved, N of each (a new process each time, as a person types them):

- ``stored``: ``hearth run --where edge --explain noop.wasm``, no --gateway: the device tries the
  address it stored for its paired gateway (hearth._known), which answers;
- ``discovery``: the same, its stored address first pointed at a closed port: the device falls
  back to mDNS discovery (what every command did before the store);
- ``named``: ``--gateway HOST:PORT`` of the device listener;
- ``baseline``: ``hearth --version``: the interpreter and the imports, what every command pays
  before it looks for a gateway.

Figures per mode, p50 and max: the wall time of the command; when its job starts, from the
process's start (the kernel's start time) to the job's publish to the gateway; from its imports
done to then; the CPU time the process used until then (on an idle core, what the start takes:
on a shared machine the wall figures grow with the load average); and what the command says
(``--explain``) finding the gateway and connecting took. The marks come from the benchmark's
wrapper around ``hearth.cli.main``; the command is otherwise unchanged. Target (issue 12): a
command with a reachable stored gateway starts its job in under 0.5 s.

    .venv/bin/python benchmarks/cli_start.py            # a table
    .venv/bin/python benchmarks/cli_start.py --json     # one JSON line on stdout
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    LOOPBACK,
    GatewayProcess,
    Summary,
    ensure_examples,
    free_port,
    print_table,
    run_and_report,
    setup_logging,
    verdict,
)
from hearth.pairing import pair
from hearth.transport import BrokerAddress

log = logging.getLogger("bench.cli_start")

TARGET_S = 0.5
_CONNECTED = re.compile(rb"connected in (\d+) ms")
_MARKS = re.compile(rb"bench-marks imported=([\d.]+) job=([\d.]+) cpu=([\d.]+)")
MODES = ("stored", "discovery", "named", "baseline")

# `hearth` itself, with two marks written to stderr, in seconds since the process started (the
# kernel's start time, /proc/self/stat: 10 ms ticks): when `hearth.cli` is imported, and when
# the job is published to the gateway's broker. Nothing else changes.
_TIMED = """
import os, sys, time
def since_start():
    ticks = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf('SC_CLK_TCK')
import hearth._connection as connection
from hearth.cli import main
imported = since_start()
publish = connection.Connection.publish
def first(self, message, *args, **kwargs):
    if type(message).__name__ == 'WasmJob' and not getattr(first, 'done', False):
        first.done = True
        sys.stderr.write(f'bench-marks imported={imported:.4f} job={since_start():.4f} '
                         f'cpu={time.process_time():.4f}\\n')
    return publish(self, message, *args, **kwargs)
connection.Connection.publish = first
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Outcome:
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[list[object]] = field(default_factory=list)


def _env(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    return {**env, "HEARTH_CONFIG_DIR": str(config), "HEARTH_INTERFACE": LOOPBACK}


def _command(mode: str, module: Path, lan: BrokerAddress) -> list[str]:
    if mode == "baseline":
        return [sys.executable, "-m", "hearth.cli", "--version"]
    cli = [sys.executable, "-c", _TIMED]
    named = ["--gateway", str(lan)] if mode == "named" else []
    return [*cli, "run", *named, "--where", "edge", "--explain", str(module)]


def _forget_address(config: Path) -> None:
    """Point the stored address at a closed port: the next command has to discover."""
    for path in config.glob("gateways/*/known.json"):
        data = json.loads(path.read_text())
        data["host"], data["port"] = LOOPBACK, free_port()
        path.write_text(json.dumps(data))


def run(work: Path, n: int) -> Outcome:
    examples = ensure_examples()
    module = examples / "wasm" / "noop.wasm"
    lan = BrokerAddress(LOOPBACK, free_port())
    pairing = BrokerAddress(LOOPBACK, free_port())
    gw = GatewayProcess(
        BrokerAddress(LOOPBACK, free_port()),
        work / "gateway",
        gateway_id="bench-cli",
        managed=True,
        workers=1,
        extra_args=[
            "--lan-listen", str(lan), "--pairing-listen", str(pairing),
            "--mdns-interface", LOOPBACK,
        ],
    )  # fmt: skip
    config = work / "device"
    walls: dict[str, list[float]] = {m: [] for m in MODES}
    found: dict[str, list[float]] = {m: [] for m in MODES}
    starts: dict[str, list[float]] = {m: [] for m in MODES}  # process start -> job sent
    after: dict[str, list[float]] = {m: [] for m in MODES}  # imports done -> job sent
    cpu: dict[str, list[float]] = {m: [] for m in MODES}  # CPU time used until job sent
    with gw:
        code = subprocess.run(
            [sys.executable, "-m", "hearth_gateway.cli", "pair", "--json", "--state-dir",
             str(gw.state_dir)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        issued = json.loads(code.stdout)
        pair(issued["code"], str(pairing), ca_fingerprint=issued["ca_fingerprint"],
             device_id="bench-device", directory=config)  # fmt: skip
        env = _env(config)
        # A first call stores where the gateway answered (and uploads the module once).
        subprocess.run(_command("stored", module, lan), env=env, check=True, capture_output=True)
        for i in range(n):
            for mode in MODES:
                if mode == "discovery":
                    _forget_address(config)
                started = time.perf_counter()
                done = subprocess.run(
                    _command(mode, module, lan), env=env, capture_output=True, timeout=120,
                    check=False,
                )  # fmt: skip
                walls[mode].append(time.perf_counter() - started)
                if done.returncode != 0:
                    raise RuntimeError(f"{mode}: exit {done.returncode}: {done.stderr.decode()}")
                match = _CONNECTED.search(done.stderr)
                if match:
                    found[mode].append(float(match.group(1)) / 1e3)
                marks = _MARKS.search(done.stderr)
                if marks:
                    imported, job = float(marks.group(1)), float(marks.group(2))
                    starts[mode].append(job)
                    after[mode].append(job - imported)
                    cpu[mode].append(float(marks.group(3)))
            log.info("round %d of %d done", i + 1, n)
    out = Outcome()
    nan = float("nan")
    for mode in MODES:
        wall = Summary.of(walls[mode])
        start = Summary.of(starts[mode]) if starts[mode] else None
        own = Summary.of(after[mode]) if after[mode] else None
        conn = Summary.of(found[mode]) if found[mode] else None
        used = Summary.of(cpu[mode]) if cpu[mode] else None
        out.rows.append([
            mode, wall.p50, wall.max, start.p50 if start else nan, start.max if start else nan,
            used.p50 if used else nan, own.p50 if own else nan, conn.p50 if conn else nan,
        ])  # fmt: skip
        if used:
            out.figures[f"{mode}_job_start_cpu_p50_s"] = used.p50
        out.figures[f"{mode}_wall_p50_s"] = wall.p50
        out.figures[f"{mode}_wall_max_s"] = wall.max
        if start and own:
            out.figures[f"{mode}_job_start_p50_s"] = start.p50
            out.figures[f"{mode}_job_start_max_s"] = start.max
            out.figures[f"{mode}_after_imports_p50_s"] = own.p50
        if conn:
            out.figures[f"{mode}_find_connect_p50_s"] = conn.p50
    f = out.figures
    f["n"] = n
    f["discovery_over_stored_job_start"] = (
        f["discovery_job_start_p50_s"] / f["stored_job_start_p50_s"]
    )
    f["target_s"] = TARGET_S
    f["stored_job_start_verdict"] = verdict(f["stored_job_start_p50_s"], TARGET_S, at_most=True)
    return out


def report(out: Outcome) -> None:
    print_table(
        ["mode", "wall p50 s", "wall max s", "job start p50 s", "job start max s",
         "CPU to job start p50 s", "after imports p50 s", "find+connect p50 s"],
        out.rows,
        title=f"hearth run --where edge noop.wasm, {out.figures['n']} processes per mode "
        "(job start: from the process's start to the job's publish)",
    )  # fmt: skip
    f = out.figures
    print(
        f"\nstored gateway: the job starts {f['stored_job_start_p50_s']:.3f} s after the "
        f"process (target < {TARGET_S} s: {f['stored_job_start_verdict']}); with a fresh "
        f"discovery {f['discovery_job_start_p50_s']:.3f} s "
        f"({f['discovery_over_stored_job_start']:.1f}x); imports alone (hearth --version, "
        f"whole process) {f['baseline_wall_p50_s']:.3f} s; CPU time the stored call used "
        f"until its job started {f['stored_job_start_cpu_p50_s']:.3f} s (what the start takes "
        "on an idle core)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument("--n", type=int, default=10, help="processes per mode (default 10)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_and_report(lambda work: run(work, args.n), args.json, report)


if __name__ == "__main__":
    raise SystemExit(main())
